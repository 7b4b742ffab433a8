"""A real `forge run --only N` killed with SIGKILL mid-phase, then `forge status` and `forge resume`: the shared
body of the phase 5-8 pipeline tests. Each test registers its source model and checks its own phase's models."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from forge.registry import ModelRegistry


def forge_command() -> list[str]:
    script = Path(sys.executable).with_name("forge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "forge.cli"]


def logged(runs: Path, marker: str) -> Callable[[Path], bool]:
    """Wait until `marker` is in a session's metrics.jsonl."""
    return lambda _output: any(marker in p.read_text() for p in runs.glob("session_*/metrics.jsonl"))


def printed(marker: str) -> Callable[[Path], bool]:
    """Wait until the run has printed `marker` (its output goes to a file, read again at every check)."""
    return lambda output: marker in output.read_text()


def kill_then_resume(tmp_path: Path, runs: Path, source: str, phase: int, sets, until, timeout: float = 400) -> str:
    """`forge run --only PHASE` on `source`'s models with the `--set` values `sets`, killed with SIGKILL once
    `until(output file)` holds: the session has no model and still reads running, `forge status` marks it interrupted,
    `forge resume` completes it. Returns the session's id."""
    command = forge_command()
    args = [a for s in (f"run_root={runs}", *sets) for a in ("--set", s)]
    output, env = tmp_path / f"phase{phase}_killed.log", {**os.environ, "PYTHONUNBUFFERED": "1"}
    with output.open("w") as sink:
        proc = subprocess.Popen([*command, "run", "--only", str(phase), "--source-session", source, *args],
                                cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not until(output):
        assert proc.poll() is None, output.read_text()[-3000:]
        assert time.monotonic() < deadline, f"phase {phase} never got as far as the test waits for"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with ModelRegistry(runs / "registry.db") as registry:
        (session,) = [s for s in registry.list_sessions() if s["id"] != source]
        assert registry.list_models(session_id=session["id"]) == [] and session["status"] == "running"
    status = subprocess.run([*command, "status", "--set", f"run_root={runs}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert f"session {session['id']}: its process died; marked interrupted" in status.stdout, status.stderr
    assert f"{session['id']}  interrupted" in status.stdout
    resumed = subprocess.run([*command, "resume", session["id"], "--set", f"run_root={runs}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with ModelRegistry(runs / "registry.db") as registry:
        assert registry.get_session(session["id"])["status"] == "completed"
    return session["id"]
