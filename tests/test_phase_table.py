"""forge.phase_table is the only list of the pipeline's phases: the config's sections, the metric catalogue,
the registry schema, the pipeline and the CLI all agree with it, for every phase number and the numbers
around them, and no other module spells the list out again."""
import argparse
import ast
import sqlite3
from pathlib import Path

import pytest
import torch

from forge import phase_table
from forge.cli import _parser, _phase_number
from forge.phase_table import FIRST_PHASE, LAST_PHASE, PHASE_NAMES, PHASES
from forge.pipeline import phases as pipeline_phases
from forge.pipeline.config import PhasesConfig, PipelineConfig
from forge.pipeline.handoff import HANDOFF_RULES
from forge.registry import ModelRegistry, new_session_id, save_checkpoint, schema
from forge.tracking import METRIC_CATALOGUE
from forge.tracking import PHASE_NAMES as TRACKING_PHASE_NAMES

NUMBERS = range(FIRST_PHASE - 1, LAST_PHASE + 2)   # every phase and one number on each side


def test_everyone_reads_the_same_table():
    assert pipeline_phases.PHASES is PHASES and TRACKING_PHASE_NAMES is PHASE_NAMES
    assert sorted(PhasesConfig.model_fields) == sorted(f"phase{n}" for n in PHASES)
    assert sorted(METRIC_CATALOGUE) == sorted(PHASES)
    assert schema.PHASES == range(FIRST_PHASE, LAST_PHASE + 1)
    assert sorted(HANDOFF_RULES) == [(n, n + 1) for n in sorted(PHASES)[:-1]]


@pytest.mark.parametrize("number", NUMBERS)
def test_config_pipeline_and_cli_agree_on_each_number(number):
    known = number in PHASES
    config = PipelineConfig()
    if known:
        assert config.phase(number) is getattr(config.phases, f"phase{number}")
        assert pipeline_phases.phase_name(number) == PHASES[number][0] == phase_table.phase_name(number)
        assert pipeline_phases.make_plan(only=number) == [number]
        assert _phase_number(str(number)) == number
        assert _parser().parse_args(["run", "--only", str(number)]).only == number
        return
    with pytest.raises(ValueError):
        config.phase(number)
    with pytest.raises(ValueError):
        pipeline_phases.phase_name(number)
    with pytest.raises(argparse.ArgumentTypeError, match=phase_table.phase_range_text()):
        _phase_number(str(number))


@pytest.mark.parametrize("number", NUMBERS)
def test_the_registry_stores_exactly_the_tables_phases(number, tmp_path):
    registry = ModelRegistry(tmp_path / "registry.db")
    session = registry.create_session(new_session_id(), {})
    path = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "m.safetensors", {"model_config": {}}).path
    if number in PHASES:
        model_id = registry.register_model(session, PHASE_NAMES[number], "m", path, {}, phase=number)
        assert registry.get_model(model_id)["phase"] == number
    else:
        with pytest.raises(ValueError, match=phase_table.phase_range_text()):
            registry.register_model(session, "x", "m", path, {}, phase=number)
        with sqlite3.connect(tmp_path / "registry.db") as conn, pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO phase_results (session_id, phase, status, duration_s, recorded_at) "
                         "VALUES (?, ?, 'completed', 0, '')", (session, number))   # the schema's own CHECK
    registry.close()


def test_no_other_module_spells_out_the_phase_list():
    names = set(PHASE_NAMES.values())
    root = Path(phase_table.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "phase_table.py":
            continue
        strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert len(names & strings) < 3, f"{path} lists phase names {sorted(names & strings)}"
