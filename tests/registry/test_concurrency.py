"""Several real processes and threads on one registry file: nothing lost, nothing locked, nothing corrupt."""
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from forge.registry import ModelRegistry, RegistryBusyError

WORKERS = 8
SESSIONS_PER_WORKER = 5

# Each worker opens the (possibly not yet existing) database itself, waits for the others, then runs
# a whole small pipeline per session: create, two phases of models with lineage, progress, phase
# results, a handoff, an artifact, the final status. Worker 0 also checkpoints and vacuums meanwhile.
_WORKER = r"""
import json, pathlib, sys, time
from forge.registry import ModelRegistry, new_session_id
db, folder, worker, sessions, go = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), pathlib.Path(sys.argv[5])
model_file = folder / f"w{worker}.bin"
model_file.write_bytes(bytes([worker]) * 4096)
with ModelRegistry(db, timeout=120) as reg:
    (folder / f"ready{worker}").touch()
    while not go.exists():
        time.sleep(0.005)
    out = []
    for k in range(sessions):
        sid = reg.create_session(new_session_id(f"w{worker}"), {"worker": worker, "k": k})
        parents = []
        for phase in (1, 2):
            mid = reg.register_model(sid, f"phase{phase}", f"m{phase}", model_file, {"parameter_count": 7},
                                     phase=phase, parent_ids=parents, tags=[f"w{worker}"])
            reg.update_session_progress(sid, phase, 50.0 * phase)
            reg.record_phase_result(sid, phase, "completed", [mid], {"k": k}, 0.01)
            parents = [mid]
        reg.register_phase_handoff(sid, 1, 2, parents, "passed", {"k": k})
        reg.register_artifact(mid, f"model-{sid}", "v0")
        reg.set_session_status(sid, "completed")
        reg.list_models(session_id=sid)
        if worker == 0:
            reg.checkpoint_wal()
            reg.vacuum_incremental()
        out.append({"session": sid, "final_model": mid})
print(json.dumps(out))
"""


@pytest.mark.distributed
def test_eight_processes_write_concurrently_without_loss_or_lock_errors(tmp_path):
    db, go = tmp_path / "registry.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(db), str(tmp_path), str(w),
                               str(SESSIONS_PER_WORKER), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(WORKERS)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{w}").exists() for w in range(WORKERS)):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    go.touch()                             # release all writers at once
    results = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert "locked" not in err and "busy" not in err, err
    reported = [entry for out, _ in results for entry in json.loads(out)]
    assert len(reported) == WORKERS * SESSIONS_PER_WORKER

    with ModelRegistry(db) as reg:
        sessions = {s["id"]: s for s in reg.list_sessions()}
        assert set(sessions) == {e["session"] for e in reported}
        assert all(s["status"] == "completed" and s["progress"] == 100.0 for s in sessions.values())
        stats = reg.get_storage_stats()
        n = WORKERS * SESSIONS_PER_WORKER
        assert stats["tables"] == {"sessions": n, "models": 2 * n, "model_tags": 2 * n, "model_parents": n,
                                   "phase_results": 2 * n, "phase_handoffs": n, "artifacts": n}
        for entry in reported:
            chain = reg.lineage(entry["final_model"])
            assert [m["phase"] for m in chain] == [2, 1]
            assert {m["session_id"] for m in chain} == {entry["session"]}
            assert sorted(reg.completed_phases(entry["session"])) == [1, 2]
    raw = sqlite3.connect(str(db))
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_threads_can_share_one_registry(tmp_path):
    model_file = tmp_path / "m.bin"
    model_file.write_bytes(b"x" * 100)
    errors = []
    with ModelRegistry(tmp_path / "r.db") as reg:
        def work(t):
            try:
                for k in range(10):
                    sid = reg.create_session(f"t{t}_{k}", {})
                    reg.register_model(sid, "cognate", "m", model_file, phase=1)
                    reg.list_models(session_id=sid)
            except Exception as error:   # collected and reported below
                errors.append(error)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(reg.list_sessions()) == 40 and len(reg.list_models()) == 40


def test_a_writer_holding_the_lock_too_long_gives_a_clear_error(tmp_path):
    db = tmp_path / "r.db"
    ModelRegistry(db).close()
    blocker = sqlite3.connect(str(db), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with ModelRegistry(db, timeout=0.3) as reg:
            with pytest.raises(RegistryBusyError, match="locked for more than 0.3 s during create_session"):
                reg.create_session("s", {})
            assert reg.get_session("s") is None          # readers are not blocked in WAL mode
    finally:
        blocker.execute("ROLLBACK")
    with ModelRegistry(db) as reg:                        # once released, the write goes through
        reg.create_session("s", {})
        assert reg.get_session("s")["status"] == "running"


def _use_inherited(reg, queue):
    try:
        reg.list_sessions()
        queue.put("no error")
    except RuntimeError as error:
        queue.put(str(error))


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork")
def test_a_registry_inherited_through_fork_refuses_to_run(tmp_path):
    with ModelRegistry(tmp_path / "r.db") as reg:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_use_inherited, args=(reg, queue))
        child.start()
        message = queue.get(timeout=60)
        child.join(timeout=60)
        assert "open a new ModelRegistry(path) in each process" in message
        assert reg.list_sessions() == []                  # the parent's connection still works
