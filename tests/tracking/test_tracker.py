import logging
import math
import os
import re
import subprocess
import sys

import pytest

from forge.tracking import METRICS_FILE, Tracker, read_metrics


def _run_file(run_dir):
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    return files[0].read_bytes()


def test_offline_runs_under_session_dir_and_jsonl_per_phase(tmp_path, monkeypatch):
    # the environment must not redirect an offline session (mode and dir are passed explicitly)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    session = tmp_path / "sess"
    with Tracker(session, "session-42") as tracker:
        assert tracker.wandb_enabled
        tracker.start_phase(1, "cognate", {"steps": 10})
        tracker.log({"train_loss": 2.5, "val_accuracy": 0.1})
        tracker.log({"train_loss": 1.5}, step=7)
        tracker.finish_phase()
        tracker.start_phase(2, "evomerge", {"generations": 2})
        tracker.log({"best_fitness": 0.75})
    assert not (tmp_path / "elsewhere").exists()
    assert len(tracker.run_dirs) == 2
    for run_dir in tracker.run_dirs:
        assert run_dir.parent == session / "wandb" and run_dir.name.startswith("offline-run-")
    first, second = (_run_file(d) for d in tracker.run_dirs)
    assert b"train_loss" in first and b"phase1-cognate" in first and b"session-42" in first
    assert b"best_fitness" in second and b"train_loss" not in second

    lines = read_metrics(session)
    assert [(r["phase"], r["phase_name"], r["step"], r["metrics"]) for r in lines] == [
        (1, "cognate", 0, {"train_loss": 2.5, "val_accuracy": 0.1}),
        (1, "cognate", 7, {"train_loss": 1.5}),
        (2, "evomerge", 0, {"best_fitness": 0.75}),
    ]
    assert all(r["session_id"] == "session-42" for r in lines)
    times = [r["time"] for r in lines]
    assert times == sorted(times) and all(t > 1e9 for t in times)


def test_offline_run_is_syncable_later(tmp_path):
    with Tracker(tmp_path, "s") as tracker:
        tracker.start_phase(1, "cognate", {})
        tracker.log({"train_loss": 1.0})
    env = dict(os.environ, WANDB_SILENT="false")
    out = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(tracker.run_dirs[0])],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "Would sync 1 run" in out.stdout + out.stderr


def test_disabled_mode_writes_jsonl_only(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="forge.tracking")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    session = tmp_path / "sess"
    with Tracker(session, "s", mode="disabled") as tracker:
        assert not tracker.wandb_enabled
        tracker.start_phase(1, "cognate", {})
        tracker.log({"val_loss": 0.5})
        assert tracker.log_model_artifact(model, "cognate-a", {}) is None
    assert sorted(p.name for p in session.iterdir()) == [METRICS_FILE]
    assert [r["metrics"] for r in read_metrics(session)] == [{"val_loss": 0.5}]
    said = [r.getMessage() for r in caplog.records if "metrics go to" in r.getMessage()]
    assert len(said) == 1 and "disabled" in said[0]


def test_missing_wandb_falls_back_to_jsonl_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)   # makes `import wandb` raise ImportError
    caplog.set_level(logging.INFO, logger="forge.tracking")
    with Tracker(tmp_path, "s", mode="offline") as tracker:
        assert not tracker.wandb_enabled
        tracker.start_phase(1, "cognate", {})
        tracker.log({"val_loss": 0.5})
        tracker.log({"val_loss": 0.4})
    assert not (tmp_path / "wandb").exists()
    assert len(read_metrics(tmp_path)) == 2
    said = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(said) == 1


def test_model_artifact_offline_returns_name_and_digest(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    with Tracker(tmp_path / "sess", "s") as tracker:
        tracker.start_phase(1, "cognate", {})
        name, version = tracker.log_model_artifact(a, "cognate-a", {"phase": 1, "seed": 1})
        _, version_b = tracker.log_model_artifact(b, "cognate-b", {"phase": 1})
        _, version_a_again = tracker.log_model_artifact(a, "cognate-a", {"phase": 1, "seed": 1})
    assert name == "cognate-a"
    assert re.fullmatch(r"offline:[0-9a-f]{32}", version)
    assert version_b != version and version_a_again == version
    assert b"cognate-a" in _run_file(tracker.run_dirs[0])


def test_non_finite_values_become_null(tmp_path):
    import torch

    with Tracker(tmp_path, "s", mode="disabled") as tracker:
        tracker.start_phase(3, "quietstar", {})
        tracker.log({"val_loss": math.nan, "val_perplexity": math.inf, "val_accuracy": torch.tensor(0.25)})
    assert read_metrics(tmp_path)[0]["metrics"] == {"val_loss": None, "val_perplexity": None, "val_accuracy": 0.25}


def test_bad_use_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Invalid mode"):
        Tracker(tmp_path, "s", mode="cloud")
    with pytest.raises(ValueError, match="session_id"):
        Tracker(tmp_path, "", mode="disabled")
    tracker = Tracker(tmp_path, "s", mode="disabled")
    with pytest.raises(RuntimeError, match="start_phase"):
        tracker.log({"val_loss": 1.0})
    with pytest.raises(ValueError, match="Invalid phase"):
        tracker.start_phase(9, "nine", {})
    tracker.start_phase(1, "cognate", {})
    tracker.log({"val_loss": 1.0}, step=5)
    with pytest.raises(ValueError, match="Invalid step"):
        tracker.log({"val_loss": 1.0}, step=4)
    with pytest.raises(TypeError, match=r"metrics\['val_loss'\]"):
        tracker.log({"val_loss": "low"})
    with pytest.raises(FileNotFoundError):
        tracker.log_model_artifact(tmp_path / "missing.safetensors", "m", {})
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="Invalid artifact name"):
        tracker.log_model_artifact(tmp_path / "m.bin", "../evil", {})
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker.start_phase(2, "evomerge", {})


def test_unknown_metric_warned_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="forge.tracking")
    with Tracker(tmp_path, "s", mode="disabled") as tracker:
        tracker.start_phase(1, "cognate", {})
        for step in range(3):
            tracker.log({"mystery": 1.0, "cognate-a/val_loss": 0.3}, step=step)
    warned = [r.getMessage() for r in caplog.records if "not in" in r.getMessage()]
    assert len(warned) == 1 and "mystery" in warned[0]
