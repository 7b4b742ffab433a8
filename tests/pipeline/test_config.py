"""Config loading: defaults, every error path with its exact message, --set overrides."""
import re
from pathlib import Path

import pytest
import yaml

from forge.pipeline import config as config_module
from forge.pipeline.config import (DEFAULT_CONFIG_PATH, KNOWN_TASKS, ConfigError, PipelineConfig, load_config)


def test_shipped_yaml_equals_the_builtin_defaults():
    from_file = load_config(DEFAULT_CONFIG_PATH)
    assert from_file == load_config() == PipelineConfig()
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert set(raw["phases"]) == {f"phase{n}" for n in range(1, 9)}
    assert load_config().phases.phase1.lr == 0.002 and load_config().phases.phase2.population_size == 8


def test_every_yaml_field_has_a_comment():
    for number, line in enumerate(DEFAULT_CONFIG_PATH.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "- {")) and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"line {number} has no comment: {line}"


@pytest.mark.parametrize("override, message", [
    ("phases.phase2.population_size=0", "phases.phase2.population_size: must be >= 2, got 0"),
    ("phases.phase1.stepz=5", "phases.phase1.stepz: unknown key"),
    ("phases.phase1.steps=abc", "phases.phase1.steps: expected an integer, got 'abc' (str)"),
    ("phases.phase1.steps=2.5", "phases.phase1.steps: expected an integer, got 2.5 (float)"),
    ("phases.phase1.lr=0", "phases.phase1.lr: must be > 0, got 0"),
    ("wandb.mode=loud", "wandb.mode: must be one of 'offline', 'online' or 'disabled', got 'loud'"),
    ("wandb.project=team/forge",
     "wandb.project: W&B project names cannot be blank or contain / \\ # ? % :, got 'team/forge'"),
    ("wandb.project='a:b'", "wandb.project: W&B project names cannot be blank or contain / \\ # ? % :, got 'a:b'"),
    ("hardware.device=tpu", "hardware.device: must be one of 'auto', 'cpu' or 'cuda', got 'tpu'"),
    ("phases.phase1.models.1.seed=-1", "phases.phase1.models[1].seed: must be >= 0, got -1"),
    ("phases.phase2.operators=[linear, magic]",
     "phases.phase2.operators[1]: must be one of 'linear', 'slerp', 'ties', 'dare', 'frankenmerge' or 'dfs', got 'magic'"),
    ("phases.phase2.fitness_weights.speed=fast", "phases.phase2.fitness_weights.speed: expected a number, got 'fast' (str)"),
    ("phases.phase2.elite_count=8", "phases.phase2: elite_count (8) must be < population_size (8)"),
    ("cleanup.auto_cleanup=maybe", "cleanup.auto_cleanup: expected true or false, got 'maybe' (str)"),
    ("phases.phase1.models=[]", "phases.phase1.models: must have at least 2 item(s), got []"),
    ("phases.phase9.steps=1", "phases.phase9: unknown key"),
])
def test_errors_name_the_yaml_path(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value).splitlines()


def test_unknown_task_and_bad_model_shape():
    with pytest.raises(ConfigError, match=r"phases.phase1.models\[0\].task_weights: unknown task 'poetry'"):
        load_config(overrides=["phases.phase1.models.0.task_weights.poetry=1.0"])
    with pytest.raises(ConfigError, match=r"phases.phase1.model: dim \(100\) must split into n_heads \(4\)"):
        load_config(overrides=["phases.phase1.model.dim=100"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  phase1:\n    steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 4, column 1"):
        load_config(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 2, column 1: duplicate key 'seed'"):
        load_config(dup)
    for text in ("{[a]: 1}\n", "? {x: 1}\n: 2\n"):      # found by tests/fuzz/fuzz_config.py: an unhashable key
        odd = tmp_path / "odd.yaml"
        odd.write_text(text)
        with pytest.raises(ConfigError, match="odd.yaml: invalid YAML: unhashable type"):
            load_config(odd)
        with pytest.raises(ConfigError, match="invalid YAML"):
            load_config(overrides=(f"phases.phase1={text.strip()}",))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("phases:\n  phase1:\n    stepz: 5\n    lr: -1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert str(info.value).splitlines() == ["phases.phase1.lr: must be > 0, got -1.0", "phases.phase1.stepz: unknown key"]


def test_a_config_file_over_the_cap_is_refused_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n" + "# padding\n" * 20)
    size = path.stat().st_size
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", size)
    assert load_config(path).seed == 1                       # exactly at the cap loads
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", size - 1)
    with pytest.raises(ConfigError, match=rf"{path}: config file is larger than the {size - 1:,}-byte cap"):
        load_config(path)
    monkeypatch.undo()
    with open(path, "r+b") as handle:                        # a sparse 600 MB file, refused at the real cap
        handle.truncate(600 << 20)
    with pytest.raises(ConfigError, match=f"{config_module.MAX_CONFIG_BYTES:,}-byte cap"):
        load_config(path)


@pytest.mark.parametrize("other", ["ma_", "ma.", "ma-", "MA"])
def test_model_names_that_share_a_checkpoint_file_are_refused(other):
    models = [f"phases.phase1.models.{i}.name={name}" for i, name in enumerate(("ma", other))]
    with pytest.raises(ConfigError, match=rf"phases.phase1.models: .*'ma' and '{re.escape(other)}' would share "
                                          r"the checkpoint file"):
        load_config(overrides=models)
    load_config(overrides=[models[0], "phases.phase1.models.1.name=mb"])   # distinct files are fine


def test_a_partial_file_keeps_the_other_defaults_and_lists_replace(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("phases:\n  phase1:\n    steps: 50\n    lr: 1e-3\n  phase2:\n    operators: [linear, ties]\n")
    config = load_config(path)
    assert config.phases.phase1.steps == 50 and config.phases.phase1.lr == 0.001   # 1e-3 reads as a float
    assert config.phases.phase2.operators == ["linear", "ties"]
    assert config.phases.phase1.batch_size == 64 and len(config.phases.phase1.models) == 3


def test_overrides_nested_lists_and_types():
    config = load_config(overrides=["phases.phase1.steps=50", "phases.phase1.lr=5e-4", "wandb.mode=disabled",
                                    "phases.phase1.model.dim=64", "phases.phase1.models.2.seed=9",
                                    "registry.path=/tmp/x.db", "cleanup.max_sessions_total=null",
                                    "phases.phase2.fitness_weights={accuracy: 2.0, loss: 0.0, speed: 0.0, memory: 0.0}"])
    assert config.phases.phase1.steps == 50 and isinstance(config.phases.phase1.steps, int)
    assert config.phases.phase1.lr == 5e-4 and config.phases.phase1.model.dim == 64
    assert config.phases.phase1.models[2].seed == 9 and config.phases.phase1.models[0].seed == 1
    assert config.wandb.mode == "disabled" and config.registry_path() == Path("/tmp/x.db")
    assert config.cleanup.max_sessions_total is None
    assert config.phases.phase2.fitness_weights.accuracy == 2.0


@pytest.mark.parametrize("override, message", [
    ("steps", "--set 'steps': expected KEY=VALUE"),
    ("=5", "--set '=5': expected KEY=VALUE"),
    ("phases.phase1.steps.deep=1", "phases.phase1.steps: is not a section (it holds a int)"),
    ("phases.phase1.models.7.seed=1", "--set phases.phase1.models.7.seed: '7' is not an index of a list of 3 items"),
    ("phases.phase1.steps=[1", "--set phases.phase1.steps: invalid YAML"),
])
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(message)


def test_known_tasks_match_forge_data():
    data = pytest.importorskip("forge.data")
    if not hasattr(data, "TASKS"):
        pytest.skip("forge.data.TASKS is not merged on this branch yet")
    assert set(KNOWN_TASKS) == set(data.TASKS)


def test_registry_path_defaults_under_the_run_root():
    assert load_config(overrides=["run_root=/tmp/r"]).registry_path() == Path("/tmp/r/registry.db")


@pytest.mark.parametrize("phase", [1, 3, 5, 6, 7])
def test_each_phases_optimizer_block_defaults_to_its_preset(phase):
    """The `optimizer:` block's defaults are the phase presets of forge.optim (phase 5's STE flag excepted:
    the original preset's leftover of an older phase order, off here)."""
    from forge.optim import MuGrokConfig

    preset, block = MuGrokConfig.from_phase(phase), PipelineConfig().phase(phase).optimizer
    assert (block.grokfast_alpha, block.grokfast_lamb, block.momentum, block.nesterov, block.weight_decay,
            block.qk_clip_threshold, block.kl_coefficient) == (
        preset.grokfast_alpha, preset.grokfast_lambda, preset.momentum, preset.nesterov, preset.weight_decay,
        preset.qk_clip_threshold, preset.kl_coefficient)
    assert block.ste_mode == (preset.muon_ste_mode and phase != 5) and block.grokfast == "ema"


@pytest.mark.parametrize("phase", [1, 3, 4])
def test_make_optimizer_from_the_block_equals_the_preset_optimizer(phase):
    """A training phase's optimizer built from its config block has exactly the hyperparameters the preset
    gave before the block existed (phase 4: the preset of phase 1 with the STE settings)."""
    import torch

    from forge.nn import build_model
    from forge.optim import MuGrokConfig, MuonGrokfast, create_optimizer_from_phase, muon_param_groups
    from forge.pipeline.training import make_optimizer

    model = build_model({"vocab_size": 16, "dim": 16, "n_layers": 1, "n_heads": 2, "max_len": 8})
    if phase == 4:
        settings = MuGrokConfig(muon_lr=3e-4, fallback_lr=3e-4, grokfast_lambda=1.5, muon_ste_mode=True, momentum=0.9)
        expected = MuonGrokfast(muon_param_groups(model), ns_dtype=torch.float32, **settings.to_kwargs())
    else:   # the pipeline pins Newton-Schulz to float32 (optimizer.ns_dtype), the preset leaves MuonGrokfast's "auto"
        expected = create_optimizer_from_phase(model, phase, lr=3e-4, adamw_lr=3e-4, ns_dtype=torch.float32)
    built = make_optimizer(model, PipelineConfig().phase(phase).optimizer, 3e-4)
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]   # noqa: E731
    assert strip(built.param_groups) == strip(expected.param_groups)
    assert built.qk_clip_threshold == expected.qk_clip_threshold and len(built._attention_modules) == 1
    assert built.defaults == expected.defaults
