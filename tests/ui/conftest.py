"""A real test-size pipeline run (the pipeline tests' driver: the real CLI with the small phases 1 and 2) that
every dashboard test reads, made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the dashboard needs the `ui` extra: pip install -e '.[ui]'")
pytest.importorskip("plotly", reason="the dashboard needs the `ui` extra: pip install -e '.[ui]'")

from _tiny_run import TINY_SETS
from _ui_run import SETS, app_test, run_driver, wait_for


@pytest.fixture(scope="session")
def live_run(tmp_path_factory) -> dict:
    """One real `forge run` of the test phases, which pauses 4 s inside phase 2 while the dashboard reads the
    registry (a connection held open throughout, the overview drawn); then the run must finish on its own."""
    from forge.ui import data

    folder = tmp_path_factory.mktemp("ui-run")
    runs = folder / "runs"
    live = run_driver(folder, "run", *SETS, env={"FORGE_TEST_SLEEP": "2:4"}, wait=False)
    try:
        started = wait_for(lambda: list(runs.glob("*/phase2.started")))
        assert started, live.communicate(timeout=60)
        reader = data.RunRoot.open(runs)
        during = app_test(runs, "Pipeline overview")
        out, err = live.communicate(timeout=300)
        after = data.list_sessions(reader)
        reader.close()
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 0, err
    return {"runs": runs, "during": during, "after": after, "stdout": out}


@pytest.fixture(scope="session")
def run_root(live_run) -> Path:
    """runs/ after that run: one completed session with 4 models."""
    return live_run["runs"]


@pytest.fixture(scope="session")
def recorded(run_root):
    """What the run recorded, read with the registry's own API (the values the pages must show)."""
    from forge.registry import ModelRegistry

    with ModelRegistry(run_root / "registry.db") as registry:
        (session,) = registry.list_sessions()
        return {"session": session, "phases": registry.completed_phases(session["id"]),
                "models": registry.list_models(), "handoffs": registry.list_phase_handoffs(session["id"])}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """What a tiny real run of phases 1-6 records (_tiny_run.py), read back through the dashboard's data layer:
    {"config", "phase_results": {"1": ...}, "models", "records"} (the phase-view tests draw from it)."""
    import subprocess
    import sys

    from forge.ui import data

    folder = tmp_path_factory.mktemp("tiny-run")
    sets = [a for s in ("run_root=runs", *TINY_SETS) for a in ("--set", s)]
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "_tiny_run.py"), "run", "--to-phase", "6", *sets],
                          cwd=folder, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = data.RunRoot.open(folder / "runs")
    try:
        session_id = data.list_sessions(run)[0]["id"]
        results = {str(p): data.phase_results(run, session_id, p) for p in range(1, 7)}
        return {"config": data.session_config(run, session_id), "models": data.list_models(run, session_id),
                "phase_results": {k: v for k, v in results.items() if v is not None},
                "records": data.read_metrics_file(run, session_id).records}
    finally:
        run.close()
