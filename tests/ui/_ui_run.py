"""Helpers of the dashboard tests: the pipeline tests' driver (the real CLI with the small phases 1 and 2)
and the dashboard under streamlit.testing (a module of its own: tests/pipeline has a conftest too)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "pipeline" / "_pipeline_driver.py"
APP = ROOT / "forge" / "ui" / "app.py"
SETS = ["--set", "phases.phase1.steps=4", "--set", "phases.phase1.lr=0.01",
        "--set", "phases.phase1.min_margin_over_baseline=0.0", "--set", "wandb.mode=disabled"]


def run_driver(cwd: Path, *args: str, env: dict | None = None, wait: bool = True):
    """`forge <args>` through the test driver in `cwd` (its runs/ is the run root)."""
    command = [sys.executable, str(DRIVER), *args]
    environment = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done


def wait_for(probe, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    return None


def app_test(run_root: Path | str, page: str, **state):
    """The dashboard as streamlit.testing runs it, on `page`, after one run."""
    from streamlit.testing.v1 import AppTest

    os.environ["FORGE_UI_RUN_ROOT"] = str(run_root)
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["page"] = page
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at
