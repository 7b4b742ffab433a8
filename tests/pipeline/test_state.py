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
