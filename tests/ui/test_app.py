"""Every dashboard page on a real pipeline run: the values shown are the run's own (a page showing fixed or
random numbers fails), and bad inputs give a clear message, not a traceback."""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from _ui_run import app_test

from forge.ui import data


def texts(at) -> str:
    """All markdown, captions, messages and code on the page, as one string."""
    parts = [e.value for kind in ("markdown", "caption", "info", "success", "warning", "error", "code", "text")
             for e in at.get(kind)]
    parts += [str(m.value) for m in at.metric]
    return "\n".join(str(p) for p in parts)


def frames(at):
    return [d.value for d in at.dataframe]


def test_overview_shows_the_sessions_phase_strip_handoffs_and_final_model(run_root, recorded):
    at = app_test(run_root, "Pipeline overview")
    session, phases = recorded["session"], recorded["phases"]
    table = frames(at)[0]
    row = table[table["session"] == session["id"]].iloc[0]
    assert row["status"] == "completed" and row["progress %"] == round(session["progress"], 1)
    assert row["current phase"] == session["current_phase"] == 2
    assert row["phase 1 (s)"] == round(phases[1]["duration_s"], 1)
    assert row["phase 2 (s)"] == round(phases[2]["duration_s"], 1)
    page = texts(at)
    assert all(f"**Phase {n}**" in page for n in range(1, 9)) and "quietstar" in page
    assert page.count(":green[**done**]") == 2 and page.count(":gray[not run]") == 6
    handoff = frames(at)[1]
    (recorded_handoff,) = recorded["handoffs"]
    assert set(handoff["handoff"]) == {"1 → 2"} and set(handoff["result"]) == {recorded_handoff["validation_status"]}
    checked = dict(zip(handoff["checked value"], handoff["value"]))
    values = data.flat_values(recorded_handoff["metrics"])
    assert "models/cognate-a/margin_over_baseline" in values and len(checked) == len(values)
    for name, value in values.items():
        assert checked[name] == (f"{value:.4g}" if isinstance(value, float) else str(value))
    champion = phases[2]["model_ids"][0]
    assert champion in page


def test_phase_pages_show_each_phases_recorded_metrics(run_root, recorded):
    for phase in (1, 2):
        at = app_test(run_root, f"Phase {phase}: {['cognate', 'evomerge'][phase - 1]}")
        metrics = frames(at)[0].set_index("metric")["value"].to_dict()
        assert metrics == pytest.approx(data.flat_numbers(recorded["phases"][phase]["metrics"]))
        assert f"{recorded['phases'][phase]['duration_s']:.1f} s" in texts(at)
        models = frames(at)[1]
        expected = [m for m in recorded["models"] if m["phase"] == phase]
        assert sorted(models["model"]) == sorted(m["id"] for m in expected)
    one = next(m for m in recorded["models"] if m["name"] == "cognate-a")
    at = app_test(run_root, "Phase 1: cognate")
    models = frames(at)[1].set_index("name")
    assert models.loc["cognate-a", "val_loss"] == pytest.approx(one["metrics"]["val_loss"])


@pytest.mark.parametrize("phase", [3, 4, 5, 6, 7, 8])
def test_a_phase_without_data_says_so_and_draws_nothing(run_root, recorded, phase):
    from forge.phase_table import PHASE_NAMES

    at = app_test(run_root, f"Phase {phase}: {PHASE_NAMES[phase]}")
    assert f"Phase {phase} ({PHASE_NAMES[phase]}) has no recorded data in session {recorded['session']['id']}" \
        in texts(at)
    assert not at.get("plotly_chart") and not at.dataframe


def test_models_page_searches_draws_lineage_verifies_and_offers_the_file(run_root, recorded):
    at = app_test(run_root, "Models")
    assert sorted(frames(at)[0]["id"]) == sorted(m["id"] for m in recorded["models"])
    at.text_input(key="model_search").input("champion").run()
    (champion,) = [m for m in recorded["models"] if m["name"] == "champion"]
    assert list(frames(at)[0]["id"]) == [champion["id"]]
    assert frames(at)[0]["sha256"][0] == champion["sha256"][:16]
    nodes = at.get("plotly_chart")[0].proto.spec
    for model in recorded["models"]:
        assert model["id"] in nodes   # the champion and its three phase-1 parents
    assert f'"sha256": "{champion["sha256"]}"' in texts(at)      # the sidecar
    at.button(key="verify").click().run()
    assert f"Verified: sha256 {champion['sha256']} matches" in texts(at)
    path = Path(champion["path"])
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        at.button(key="verify").click().run()
        assert "Mismatch: sha256" in texts(at) and "the file was changed" in texts(at)
    finally:
        path.write_bytes(original)
    assert at.get("download_button")


def test_compare_page_puts_sessions_side_by_side(tmp_path, run_root, recorded):
    at = app_test(run_root, "Compare", compare_phase=2)
    table = frames(at)[0]
    session = recorded["session"]["id"]
    for name, value in data.flat_numbers(recorded["phases"][2]["metrics"]).items():
        assert table.loc[name, session] == pytest.approx(value)
    models = frames(at)[1]
    for model_id in models.columns:
        model = next(m for m in recorded["models"] if m["id"] == model_id)
        assert models.loc["size (MiB)", model_id] == pytest.approx(model["size_bytes"] / 2**20)


def test_config_page_shows_the_session_config_and_validates_like_the_cli(run_root):
    at = app_test(run_root, "Config")
    assert any("steps: 4" in c.value and "lr: 0.01" in c.value for c in at.code)   # this run's --set values
    editor = at.text_area(key="config_editor")
    editor.input(editor.value.replace("steps: 4", "steps: -1", 1)).run()
    at.button(key="config_validate").click().run()
    assert "phases.phase1.steps: must be >= 1, got -1" in texts(at)
    editor = at.text_area(key="config_editor")
    editor.input(editor.value.replace("steps: -1", "steps: 5", 1)).run()
    at.button(key="config_validate").click().run()
    assert "config ok" in texts(at)


def test_system_page_shows_cpu_memory_and_disk(run_root):
    at = app_test(run_root, "System")
    values = {m.label: m.value for m in at.metric}
    assert values["CPU cores"] == str(os.cpu_count())
    free = shutil.disk_usage(run_root).free / 2**30
    assert abs(float(values["Disk free (run root)"].split()[0]) - free) < 1.0
    assert "GPU" in texts(at)


def test_bad_run_roots_and_registries_give_a_clear_message(tmp_path, run_root):
    at = app_test(tmp_path / "nowhere", "Pipeline overview")
    assert "does not exist; start a run" in at.error[0].value
    at = app_test(tmp_path, "Models")
    assert "has no registry (registry.db) yet" in at.error[0].value
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "registry.db").write_bytes(b"not a database at all" * 100)
    at = app_test(bad, "Pipeline overview")
    assert "is not a forge registry (not an SQLite database)" in at.error[0].value
    torn = tmp_path / "torn"
    torn.mkdir()
    whole = (run_root / "registry.db").read_bytes()
    (torn / "registry.db").write_bytes(whole[: len(whole) // 2])     # a copy cut off half way
    for page in ("Pipeline overview", "Models", "Phase 1: cognate"):
        at = app_test(torn, page)
        assert "cannot be read" in at.error[0].value and "corrupted" in at.error[0].value


def test_a_truncated_metrics_file_is_named_and_the_rest_still_shown(tmp_path, run_root, recorded):
    copy = tmp_path / "runs"
    shutil.copytree(run_root, copy)
    session = recorded["session"]["id"]
    metrics = copy / session / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + lines[-1][: len(lines[-1]) // 2])   # a write cut short by a kill
    at = app_test(copy, "Phase 2: evomerge")
    assert f"line {len(lines) + 1} is not complete JSON (cut short?); it was skipped" in at.warning[0].value
    shown = frames(at)[0].set_index("metric")["value"].to_dict()
    assert shown == pytest.approx(data.flat_numbers(recorded["phases"][2]["metrics"]))


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("registry.db*"))}


def test_the_dashboard_reads_read_only_and_never_blocks_a_run(live_run):
    from forge.ui.app import PAGES

    run_root = live_run["runs"]
    # during the run (the pipeline paused in phase 2, a dashboard connection open): it showed the run going ...
    during = live_run["during"]
    assert frames(during)[0]["status"][0] == "running"
    assert ":orange[**running**]" in texts(during) and "refreshes every 5 s" in texts(during)
    # ... and the run went on to finish and write its results past the open read-only connection
    assert live_run["after"][0]["status"] == "completed"
    before = digest(run_root)
    for page in PAGES[:3] + ["Models", "Compare"]:
        app_test(run_root, page)
    assert digest(run_root) == before                                     # nothing changed, nothing created
    run = data.RunRoot.open(run_root)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        run.conn.execute("DELETE FROM sessions")
    run.close()


def make_registry(run_root: Path, sessions: int) -> None:
    """A real registry of `sessions` sessions through the registry's own API: six phases each with a model,
    a result and a handoff; the newest session still running, one failed in phase 4."""
    from forge.registry import ModelRegistry

    files = run_root / "files"
    files.mkdir(parents=True)
    with ModelRegistry(run_root / "registry.db") as registry:
        for index in range(sessions):
            session = registry.create_session(f"session_{index:04d}", {"plan": {"phases": list(range(1, 9))}})
            parents: list[str] = []
            for phase in range(1, 7):
                if index == 7 and phase == 4:
                    registry.record_phase_result(session, phase, "failed", [], {"error": "accuracy fell"}, 1.0)
                    registry.set_session_status(session, "failed", error="phase 4 failed")
                    break
                path = files / f"p{phase}.bin"
                if not path.exists():
                    path.write_bytes(bytes(range(256)) * (phase + 1))
                model = registry.register_model(session, f"phase{phase}", f"model{phase}", path, phase=phase,
                                                metrics={"val_accuracy": index / sessions}, parent_ids=parents)
                if parents:
                    registry.register_phase_handoff(session, phase - 1, phase, parents, "passed", {"n": 1})
                registry.record_phase_result(session, phase, "completed", [model], {"val_accuracy": index / sessions},
                                             float(phase))
                registry.update_session_progress(session, phase, 100.0 * phase / 8)
                parents = [model]
            else:
                if index != sessions - 1:
                    registry.set_session_status(session, "completed")


def test_overview_of_a_hundred_sessions(tmp_path, capsys):
    import time

    make_registry(tmp_path, 100)
    started = time.perf_counter()
    at = app_test(tmp_path, "Pipeline overview")
    seconds = time.perf_counter() - started
    table = frames(at)[0]
    assert len(table) == 100 and "Sessions (100)" in texts(at)
    assert table.set_index("session").loc["session_0007", "status"] == "failed"
    assert table.set_index("session").loc["session_0099", "status"] == "running"
    assert set(table["phase 6 (s)"].dropna()) == {6.0}
    started = time.perf_counter()
    app_test(tmp_path, "Pipeline overview")        # a new script run in a warm process (modules imported)
    again = time.perf_counter() - started
    with capsys.disabled():
        print(f"\noverview of 100 sessions: first render {seconds:.2f} s (imports included), warm render {again:.2f} s (AppTest)")
    failed = app_test(tmp_path, "Pipeline overview", session="session_0007")
    assert "Phase 4 (bitnet) failed: accuracy fell" in texts(failed) and "Reason: phase 4 failed" in texts(failed)


def test_forge_ui_refuses_a_bad_port(capsys):
    from forge import cli

    assert cli.main(["ui", "--port", "70000"]) == cli.EXIT_USAGE
    assert "forge ui: error: --port must be in 1..65535, got 70000" in capsys.readouterr().err


def test_config_page_starts_forge_run_and_its_session_shows(tmp_path, run_root):
    import signal
    import time

    copy = tmp_path / "runs"
    shutil.copytree(run_root, copy)
    at = app_test(copy, "Config")
    editor = at.text_area(key="config_editor")
    editor.input(editor.value.replace("steps: 4", "steps: -1", 1)).run()
    at.button(key="config_run").click().run()
    assert "phases.phase1.steps: must be >= 1, got -1" in texts(at) and "started_runs" not in at.session_state
    editor = at.text_area(key="config_editor")
    editor.input(editor.value.replace("steps: -1", "steps: 4", 1)).run()
    at.button(key="config_run").click().run()
    ((pid, log_path),) = at.session_state["started_runs"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            run = data.RunRoot.open(copy)
            sessions = data.list_sessions(run)
            run.close()
            if len(sessions) == 2:
                break
            time.sleep(0.5)
        assert len(sessions) == 2, Path(log_path).read_text()
        overview = app_test(copy, "Pipeline overview")
        assert sessions[0]["id"] in set(frames(overview)[0]["session"])
    finally:
        os.killpg(pid, signal.SIGKILL)   # the run this test started (its own process group); its end is not needed
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:        # already reaped by its Popen
            pass
