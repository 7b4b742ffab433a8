"""The real `forge` CLI over a real registry, with the small test phases in the phase table."""
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).resolve().parent / "_pipeline_driver.py"
SETS = ["--set", "phases.phase1.steps=4", "--set", "phases.phase1.lr=0.01",
        "--set", "phases.phase1.min_margin_over_baseline=0.0", "--set", "wandb.mode=disabled"]


def forge(tmp_path, *args):
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_run_status_models_rollback_resume(tmp_path):
    run = forge(tmp_path, "run", *SETS)
    assert run.returncode == 0, run.stderr
    assert "phase 3 (quietstar) is not implemented yet; stopped after phase 2 (evomerge)" in run.stdout
    assert "phases 1..2 (phase 3 is not implemented yet; the run stops there)" in run.stdout
    (session,) = [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert "1 cognate" in run.stdout and "margin_over_baseline" in run.stdout and "2 evomerge" in run.stdout
    (champion,) = [w for w in run.stdout.split() if w.startswith("p2-champion-")][:1]
    assert f"final model {champion}:" in run.stdout and "forge.load_model(" in run.stdout
    status = forge(tmp_path, "status")
    assert status.returncode == 0 and session in status.stdout and "completed" in status.stdout
    assert "phase 2  100%  phases 1..2 done" in status.stdout
    models = forge(tmp_path, "models", "--phase", "1")
    assert models.returncode == 0 and len(models.stdout.splitlines()) == 3
    assert all("phase 1" in line for line in models.stdout.splitlines())
    rollback = forge(tmp_path, "rollback", session, "1")
    assert rollback.returncode == 0, rollback.stderr
    assert rollback.stdout.count("verified") == 3
    detail = forge(tmp_path, "status", session)
    assert "interrupted" in detail.stdout and "phase 1: completed" in detail.stdout
    assert "phase 2: completed" not in detail.stdout
    resume = forge(tmp_path, "resume", session)
    assert resume.returncode == 0, resume.stderr
    listed = forge(tmp_path, "models", "--phase", "2", "--session", session).stdout.splitlines()
    assert len(listed) == 2 and "1 superseded model(s) not shown" in listed[1] and "fitness" in listed[0]
    everything = forge(tmp_path, "models", "--phase", "2", "--all").stdout.splitlines()
    assert len(everything) == 2 and [line.endswith("(superseded)") for line in everything] == [True, False]
    assert champion in everything[0] and "phase2_evomerge-r1" in everything[1]
    clean = forge(tmp_path, "clean")
    assert "deleted 0 session(s), 1 model(s), 2 checkpoint file(s)" in clean.stdout, clean.stdout
    assert len(forge(tmp_path, "models", "--all").stdout.splitlines()) == 4
    first = sorted((tmp_path / "runs" / session / "phase1_cognate").glob("*.safetensors"))
    first[0].write_bytes(first[1].read_bytes())
    refused = forge(tmp_path, "rollback", session, "1")
    assert refused.returncode == 1 and "ChecksumError" in refused.stderr and "sha256" in refused.stderr
    unknown = forge(tmp_path, "resume", "no-such-session")
    assert unknown.returncode == 2 and "unknown session 'no-such-session'" in unknown.stderr   # a bad request


def test_clean_removes_everything_of_a_session_it_deletes_and_counts_it(tmp_path):
    for _ in range(2):
        assert forge(tmp_path, "run", *SETS).returncode == 0
    runs = tmp_path / "runs"
    old, new = sorted(p.name for p in runs.iterdir() if p.is_dir())   # ids sort by start time
    clean = forge(tmp_path, "clean", "--set", "cleanup.max_sessions_total=1")
    assert clean.returncode == 0, clean.stderr
    assert f"deleted session {old} and its folder" in clean.stdout
    assert "deleted 1 session(s), 4 model(s), 8 checkpoint file(s)" in clean.stdout   # 3 + 1 models, + sidecars
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [new]
    models = forge(tmp_path, "models")
    assert len(models.stdout.splitlines()) == 4 and old not in models.stdout
    auto = forge(tmp_path, "run", *SETS, "--set", "cleanup.auto_cleanup=true", "--set", "cleanup.max_sessions_total=1")
    assert auto.returncode == 0 and f"deleted session {new} and its folder" in auto.stdout, auto.stderr
    assert len([p for p in runs.iterdir() if p.is_dir()]) == 1
