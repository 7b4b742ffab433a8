"""Pipeline runs with real small phases, a real SQLite registry, real checkpoints and real processes."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forge.pipeline.config import load_config
from forge.pipeline.controller import PipelineError
from forge.pipeline.orchestrator import Pipeline
from forge.registry import ModelRegistry
from forge.registry.checkpoint import ChecksumError, metadata_path_for

HERE = Path(__file__).resolve().parent
FAST = ("phases.phase1.steps=4", "phases.phase1.lr=0.01", "phases.phase1.min_margin_over_baseline=0.0")


class Killed(BaseException):
    """Stands for the process dying at this point: nothing after it runs, no except clause catches it."""


def make(tmp_path, *extra):
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", "wandb.mode=disabled", *FAST, *extra))
    registry = ModelRegistry(config.registry_path())
    return Pipeline(config, registry, log=lambda _msg: None, progress_bars=False), registry


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_all_registers_every_phase_and_stops_at_the_first_unimplemented(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)
    report = pipeline.run()
    assert report.completed == [1, 2]
    assert "phase 3 (quietstar) is not implemented yet; stopped after phase 2" in report.message
    session = registry.get_session(report.session_id)
    assert session["status"] == "completed" and (session["current_phase"], session["progress"]) == (2, 100.0)
    p1 = registry.list_models(session_id=report.session_id, phase=1)
    p2 = registry.list_models(session_id=report.session_id, phase=2)
    assert len(p1) == 3 and len(p2) == 1
    assert sorted(p2[0]["parent_ids"]) == sorted(m["id"] for m in p1)
    for record in p1 + p2:
        path = Path(record["path"])
        assert path.parent.name in ("phase1_cognate", "phase2_evomerge") and path.suffix == ".safetensors"
        assert path.parent.parent.name == report.session_id
    handoffs = registry.list_phase_handoffs(report.session_id)
    assert [(h["validation_status"] if "validation_status" in h else h["status"]) for h in handoffs] == ["passed"]
    # the champion really is the average of the three phase-1 models (the phase ran on the saved inputs)
    loaded = pipeline.load_models([m["id"] for m in p1])
    champion = pipeline.load_models([p2[0]["id"]])[0].model
    avg = {k: sum(m.model.state_dict()[k] for m in loaded) / 3 for k in champion.state_dict()}
    assert all(torch.allclose(champion.state_dict()[k], avg[k]) for k in avg)


def test_only_and_from_phase_take_inputs_from_an_earlier_session(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)
    first = pipeline.run(only=1)
    assert first.completed == [1]
    assert registry.list_models(session_id=first.session_id, phase=2) == []
    second = pipeline.run(from_phase=2)
    assert second.completed == [2]
    (champion,) = registry.list_models(session_id=second.session_id)
    assert sorted(champion["parent_ids"]) == sorted(first.final_model_ids)
    only2 = pipeline.run(only=2, source_session=first.session_id)
    assert only2.completed == [2]


def test_from_phase_without_earlier_models_fails_clearly(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)
    with pytest.raises(PipelineError, match="phase 2 needs the models of phase 1"):
        pipeline.run(from_phase=2)
    assert registry.list_sessions() == []
    with pytest.raises(PipelineError, match="unknown phase 9"):
        pipeline.run(only=9)


def test_resume_after_a_phase_raised(tmp_path, test_phases):
    from _pipeline_test_phases import MergePhase

    pipeline, registry = make(tmp_path)
    MergePhase.fail_times = 1
    with pytest.raises(PipelineError, match="merge exploded"):
        pipeline.run()
    (session,) = registry.list_sessions()
    assert session["status"] == "failed" and "merge exploded" in session["error"]
    p1_ids = [m["id"] for m in registry.list_models(session_id=session["id"], phase=1)]
    report = pipeline.resume(session["id"])
    assert report.completed == [1, 2]
    assert [m["id"] for m in registry.list_models(session_id=session["id"], phase=1)] == p1_ids
    assert len(registry.list_models(session_id=session["id"], phase=2)) == 1
    assert registry.get_session(session["id"])["status"] == "completed"


@pytest.mark.parametrize("die_after", [1, 2])
def test_killed_between_saving_and_registering_registers_nothing_twice(tmp_path, test_phases, die_after):
    """The process dies after the phase-1 checkpoints are saved, after `die_after` registrations."""
    pipeline, registry = make(tmp_path)
    real_register, calls = registry.register_model, []

    def dying_register(*args, **kwargs):
        if len(calls) == die_after:
            raise Killed()
        calls.append(real_register(*args, **kwargs))
        return calls[-1]

    registry.register_model = dying_register
    with pytest.raises(Killed):
        pipeline.run()
    registry.register_model = real_register
    (session,) = registry.list_sessions()
    assert len(registry.list_models(session_id=session["id"])) == die_after
    pipeline.resume(session["id"])
    p1 = registry.list_models(session_id=session["id"], phase=1)
    assert len(p1) == 3 and [m["id"] for m in p1][:die_after] == calls
    assert len(registry.list_models(session_id=session["id"], phase=2)) == 1


def test_handoff_failure_stops_the_run_with_the_reason(tmp_path, test_phases):
    pipeline, registry = make(tmp_path, "phases.phase1.min_margin_over_baseline=1.0")
    with pytest.raises(PipelineError, match=r"handoff 1->2: model 'cognate-a': margin_over_baseline = .* must be >= 1"):
        pipeline.run()
    (session,) = registry.list_sessions()
    assert session["status"] == "failed"
    assert registry.list_models(session_id=session["id"], phase=2) == []
    assert len(registry.list_models(session_id=session["id"], phase=1)) == 3
    statuses = [h.get("validation_status", h.get("status")) for h in registry.list_phase_handoffs(session["id"])]
    assert statuses == ["failed"]


def test_rollback_reloads_the_exact_weights_and_the_session_continues_from_there(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)
    report = pipeline.run()
    sid = report.session_id
    p1 = registry.list_models(session_id=sid, phase=1)
    before = pipeline.load_models([m["id"] for m in p1])
    loaded = pipeline.rollback(sid, 1)
    assert [item.model_id for item in loaded] == [m["id"] for m in p1]
    assert all(weights_equal(a.model, b.model) for a, b in zip(loaded, before))
    assert sorted(pipeline.completed(sid)) == [1]
    old_champion = registry.list_models(session_id=sid, phase=2)[0]
    resumed = pipeline.resume(sid)
    p2 = registry.list_models(session_id=sid, phase=2)
    assert len(p2) == 2 and resumed.final_model_ids == [p2[1]["id"]]
    assert Path(p2[1]["path"]).parent.name == "phase2_evomerge-r1"
    assert pipeline.load_models([old_champion["id"]])   # the rolled-back model is still intact
    assert [m["id"] for m in registry.list_models(session_id=sid, phase=1)] == [m["id"] for m in p1]


def test_a_swapped_checkpoint_file_is_refused(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)
    report = pipeline.run(only=1)
    a, b = registry.list_models(session_id=report.session_id, phase=1)[:2]
    Path(a["path"]).write_bytes(Path(b["path"]).read_bytes())
    with pytest.raises(ChecksumError):
        pipeline.rollback(report.session_id, 1)
    with pytest.raises(PipelineError, match="sha256"):
        pipeline.run(from_phase=2, source_session=report.session_id)


def test_a_sidecar_edited_after_registering_is_refused_and_the_registry_rebuilds_without_it(tmp_path, test_phases):
    from _pipeline_test_phases import TOKENIZER

    pipeline, registry = make(tmp_path)
    report = pipeline.run(only=1)
    ids = report.final_model_ids
    meta_path = metadata_path_for(Path(registry.get_model(ids[0])["path"]))
    original = meta_path.read_text()
    meta_path.write_text(original.replace("abcdef", "abdcef"))          # two tokenizer characters swapped
    with pytest.raises(ChecksumError, match=rf"{meta_path}: its metadata differs"):
        pipeline.load_models(ids)
    with pytest.raises(PipelineError, match="its metadata differs"):
        pipeline.run(from_phase=2, source_session=report.session_id)
    meta_path.unlink()                                                  # the registry holds the original
    loaded = pipeline.load_models(ids)
    assert [item.metadata["tokenizer"] for item in loaded] == [TOKENIZER] * len(ids)
    assert pipeline.run(from_phase=2, source_session=report.session_id).completed == [2]


def test_a_sidecar_edited_before_registering_is_refused_on_resume(tmp_path, test_phases):
    """Killed after saving phase 1 and before registering it: resume registers from the manifest, and an
    edited sidecar is refused instead of registered."""
    pipeline, registry = make(tmp_path)
    real_register = registry.register_model

    def dying_register(*args, **kwargs):
        raise Killed()

    registry.register_model = dying_register
    with pytest.raises(Killed):
        pipeline.run()
    registry.register_model = real_register
    (session,) = registry.list_sessions()
    meta_path = next((pipeline.session_dir(session["id"]) / "phase1_cognate").glob("cognate-a.json"))
    meta_path.write_text(meta_path.read_text().replace("abcdef", "abdcef"))
    with pytest.raises(PipelineError, match="its metadata differs"):
        pipeline.resume(session["id"])
    assert registry.list_models(session_id=session["id"]) == []


@pytest.mark.parametrize("names", [("ma", "ma_", "ma."), ("ma", "MA", "mb")])
def test_model_names_that_share_a_file_are_refused_before_saving(tmp_path, test_phases, monkeypatch, names):
    from _pipeline_test_phases import TrainPhase

    original = TrainPhase.execute

    def renamed(self, ctx):
        result = original(self, ctx)
        for output, name in zip(result.models, names):
            output.name = name
        return result

    monkeypatch.setattr(TrainPhase, "execute", renamed)
    pipeline, registry = make(tmp_path)
    with pytest.raises(PipelineError, match=rf"models 'ma' and '{re.escape(names[1])}' would share the "
                                            r"checkpoint file .*phase1_cognate/ma.safetensors"):
        pipeline.run()
    assert registry.list_models() == []
    assert list((tmp_path / "runs").rglob("*.safetensors")) == []


def test_output_validation_rejects_a_model_without_its_tokenizer(tmp_path, test_phases, monkeypatch):
    from _pipeline_test_phases import TOKENIZER, TrainPhase

    original = TrainPhase.execute

    def without_tokenizer(self, ctx):
        result = original(self, ctx)
        del result.models[0].metadata["tokenizer"]
        return result

    monkeypatch.setattr(TrainPhase, "execute", without_tokenizer)
    pipeline, registry = make(tmp_path)
    with pytest.raises(PipelineError, match="metadata lacks tokenizer"):
        pipeline.run()
    assert registry.list_models() == [] and TOKENIZER


def _driver(tmp_path, *args, env_extra=None, **kwargs):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, str(HERE / "_pipeline_driver.py"), *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def test_sigkill_during_phase_2_then_resume_loses_and_duplicates_nothing(tmp_path):
    sets = [a for s in FAST for a in ("--set", s)] + ["--set", "wandb.mode=disabled"]
    proc = _driver(tmp_path, "run", *sets, env_extra={"FORGE_TEST_SLEEP": "2:60"})
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/phase2.started")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "phase 2 never started"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (session_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    sid = session_dir.name
    with ModelRegistry(runs / "registry.db") as registry:
        p1_before = registry.list_models(session_id=sid, phase=1)
        assert len(p1_before) == 3 and registry.list_models(session_id=sid, phase=2) == []
        assert registry.get_session(sid)["status"] == "running"   # killed: nobody could record anything else
    resumed = _driver(tmp_path, "resume", sid)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "not implemented yet" in out
    with ModelRegistry(runs / "registry.db") as registry:
        p1 = registry.list_models(session_id=sid, phase=1)
        p2 = registry.list_models(session_id=sid, phase=2)
        assert [m["id"] for m in p1] == [m["id"] for m in p1_before]
        assert len(p2) == 1 and sorted(p2[0]["parent_ids"]) == sorted(m["id"] for m in p1)
        assert sorted(registry.completed_phases(sid)) == [1, 2]
        assert registry.get_session(sid)["status"] == "completed"
        pipeline = Pipeline(load_config(overrides=(f"run_root={runs}",)), registry, log=lambda _m: None)
        champion = pipeline.load_models([p2[0]["id"]])[0]
        assert champion.metadata["tokenizer"]["kind"] == "test-chars"
    assert json.loads((session_dir / "phase2_evomerge" / "phase_result.json").read_text())["phase"] == 2
    assert _phase_steps(session_dir, 2) == [0, 1, 2, 3]    # the killed attempt's steps are not left twice


def _phase_steps(session_dir, phase):
    from forge.tracking.tracker import read_metrics

    return [r["step"] for r in read_metrics(session_dir) if r["phase"] == phase]


def test_resume_after_kills_reads_as_if_the_run_had_never_been_killed(tmp_path, test_phases, monkeypatch):
    """Killed once right after the 1->2 handoff was registered (before the session state says so), once in the
    middle of phase 2 (steps logged, a checkpoint half written): the resumed session has one handoff, one
    metrics record per step and no temporary file."""
    from _pipeline_test_phases import MergePhase

    pipeline, registry = make(tmp_path)
    real_handoff = registry.register_phase_handoff

    def dying_handoff(*args, **kwargs):
        real_handoff(*args, **kwargs)
        raise Killed()

    monkeypatch.setattr(registry, "register_phase_handoff", dying_handoff)
    with pytest.raises(Killed):
        pipeline.run()
    monkeypatch.setattr(registry, "register_phase_handoff", real_handoff)
    (session,) = registry.list_sessions()
    session_dir = pipeline.session_dir(session["id"])
    monkeypatch.setattr(MergePhase, "die_with", Killed)
    with pytest.raises(Killed):
        pipeline.resume(session["id"])
    assert _phase_steps(session_dir, 2) == [0, 1, 2]
    stale = session_dir / "phase2_evomerge" / f".champion.safetensors.{os.getpid()}.0badf00d.tmp"
    stale.write_bytes(b"half a checkpoint")
    report = pipeline.resume(session["id"])
    assert report.completed == [1, 2]
    handoffs = registry.list_phase_handoffs(session["id"])
    assert [(h["source_phase"], h["target_phase"]) for h in handoffs] == [(1, 2)]
    assert _phase_steps(session_dir, 2) == [0, 1, 2, 3]    # 3 steps + the phase's final metrics
    assert len(_phase_steps(session_dir, 1)) == 1
    assert list(session_dir.rglob("*.tmp")) == []


def test_a_model_registered_before_a_kill_gets_its_artifact_on_resume(tmp_path, test_phases):
    pytest.importorskip("wandb")
    pipeline, registry = make(tmp_path, "wandb.mode=offline")
    real_register = registry.register_model

    def register_then_die(*args, **kwargs):
        real_register(*args, **kwargs)
        raise Killed()          # before the W&B artifact of this model was logged

    registry.register_model = register_then_die
    with pytest.raises(Killed):
        pipeline.run(only=1)
    registry.register_model = real_register
    (session,) = registry.list_sessions()
    (adopted,) = registry.list_models(session_id=session["id"])
    assert adopted["artifacts"] == []
    pipeline.resume(session["id"])
    models = registry.list_models(session_id=session["id"])
    assert len(models) == 3 and models[0]["id"] == adopted["id"]
    assert all(len(m["artifacts"]) == 1 for m in models), [m["artifacts"] for m in models]


def test_a_registry_that_fills_up_mid_run_fails_the_run_in_one_clear_line(tmp_path, test_phases, monkeypatch):
    """SQLite's own 'database or disk is full' (max_page_count reached while phase 2 registers its model):
    the run fails naming the file and what to do, the session is marked failed, phase 1 stays, and resume
    finishes once there is room."""
    from _pipeline_test_phases import MergePhase

    monkeypatch.setattr(MergePhase, "metadata_padding", 20_000)   # the model's row needs new pages
    pipeline, registry = make(tmp_path)

    def fill_up(message):
        if message.startswith("phase 2 (evomerge): running"):
            pages = registry._conn.execute("PRAGMA page_count").fetchone()[0]
            registry._conn.execute(f"PRAGMA max_page_count = {pages}")

    pipeline.log = fill_up
    with pytest.raises(PipelineError) as raised:
        pipeline.run()
    message = str(raised.value)
    assert "database or disk is full" in message and str(registry.path) in message
    assert "free space" in message and "forge resume" in message and "\n" not in message
    (session,) = registry.list_sessions()
    assert session["status"] == "failed" and "disk is full" in session["error"]
    assert sorted(registry.completed_phases(session["id"])) == [1]
    registry._conn.execute("PRAGMA max_page_count = 1073741823")
    assert pipeline.resume(session["id"]).completed == [1, 2]


def test_a_registry_deleted_during_a_run_is_noticed(tmp_path, test_phases):
    pipeline, registry = make(tmp_path)

    def delete_registry(message):
        if message.startswith("phase 2 (evomerge): running"):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{registry.path}{suffix}").unlink(missing_ok=True)

    pipeline.log = delete_registry
    with pytest.raises(PipelineError, match="deleted or replaced while this process had it open"):
        pipeline.run()
    assert not registry.path.exists()                      # nothing wrote a new, silently partial registry
    (session_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(list((session_dir / "phase1_cognate").glob("*.safetensors"))) == 3
