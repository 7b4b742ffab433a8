"""The small per-session files: their reads are capped, so a huge or damaged file cannot exhaust memory."""
import pytest

from forge.pipeline import state as files


def test_a_session_file_over_the_cap_is_refused_naming_it(tmp_path, monkeypatch):
    files.write_state(tmp_path, {"rollbacks": [{"phase": 1, "stale": {}}], "handoffs": {}})
    path = tmp_path / files.STATE
    size = path.stat().st_size
    monkeypatch.setattr(files, "MAX_JSON_BYTES", size)
    assert files.read_state(tmp_path)["rollbacks"] == [{"phase": 1, "stale": {}}]   # exactly at the cap
    monkeypatch.setattr(files, "MAX_JSON_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{path}: session file is larger than the {size - 1:,}-byte cap"):
        files.read_state(tmp_path)


def test_a_sparse_600_mb_manifest_is_refused_at_the_real_cap(tmp_path):
    path = tmp_path / files.MANIFEST
    files.write_json(path, {"phase": 1, "models": []})
    with open(path, "r+b") as handle:
        handle.truncate(600 << 20)
    with pytest.raises(ValueError, match=rf"{path}: session file is larger than the "
                                         rf"{files.MAX_JSON_BYTES:,}-byte cap"):
        files.read_json(path)


def test_damaged_session_files_get_one_clear_error(tmp_path):
    path = tmp_path / files.STATE
    path.write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        files.read_state(tmp_path)


def test_a_running_session_whose_process_died_is_marked_interrupted(tmp_path):
    """A session still 'running' in the registry: kept while a process holds its lock (alive) or no run has
    taken it yet (starting), marked interrupted once the lock is free (its process died)."""
    from forge.pipeline.state import SessionLock, reap_dead_sessions
    from forge.registry import ModelRegistry

    with ModelRegistry(tmp_path / "registry.db") as registry:
        alive, dead, starting, done = (registry.create_session(name, {})
                                       for name in ("alive", "dead", "starting", "done"))
        registry.set_session_status(done, "completed")
        for session in (alive, dead, done):
            (tmp_path / session).mkdir()
            with SessionLock(tmp_path / session):      # a run took the lock once
                pass
        with SessionLock(tmp_path / alive):              # and this one's process is still running
            assert reap_dead_sessions(registry, tmp_path) == [dead]
        assert registry.get_session(dead)["status"] == "interrupted"
        assert "its process died" in registry.get_session(dead)["error"] and f"forge resume {dead}" in \
            registry.get_session(dead)["error"]
        assert [registry.get_session(s)["status"] for s in (alive, starting, done)] == ["running", "running",
                                                                                       "completed"]
        assert reap_dead_sessions(registry, tmp_path) == [alive]      # now its lock is free too
