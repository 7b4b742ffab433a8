"""ModelRegistry on real SQLite files: sessions, models, lineage, phases, migrations, vacuum, cleanup."""
import hashlib
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import torch

from forge.registry import (SCHEMA_VERSION, ChecksumError, CleanupPolicy, ModelRegistry, new_session_id,
                            safe_name, save_checkpoint)


@pytest.fixture
def reg(tmp_path):
    with ModelRegistry(tmp_path / "registry.db") as registry:
        yield registry


def _ckpt(folder, name, seed=0, **metadata):
    g = torch.Generator().manual_seed(seed)
    return save_checkpoint({"w": torch.randn(4, 3, generator=g)}, folder / f"{name}.safetensors", metadata).path


def _raw(path):
    return sqlite3.connect(str(path))


# -- ids and names ------------------------------------------------------------------------------
def test_session_ids_are_unique_within_one_second_and_file_safe():
    ids = [new_session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(safe_name(i) == i for i in ids)
    assert new_session_id("run 7/x").startswith("run_7_x_")


def test_safe_name_removes_path_tricks():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("a b/c\\d:e") == "a_b_c_d_e"
    assert len(safe_name("x" * 500)) == 128
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9._-\]"):
        safe_name("..")
    with pytest.raises(TypeError):
        safe_name(3)


# -- pragmas and schema -------------------------------------------------------------------------
def test_fresh_database_has_wal_foreign_keys_and_incremental_auto_vacuum(tmp_path):
    path = tmp_path / "r.db"
    with ModelRegistry(path) as reg:
        reg.create_session("s1", {})
        fk = reg._connection().execute("PRAGMA foreign_keys").fetchone()[0]
        # set before the first table, so no VACUUM was needed to fix it (the seed's bug)
        assert reg.open_report == {"upgraded_from": 0, "converted_auto_vacuum": False}
    raw = _raw(path)
    assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2          # 2 = INCREMENTAL
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert fk == 1


V1_DDL = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN
  ('running','completed','failed','interrupted')), current_phase INTEGER NOT NULL DEFAULT 0
  CHECK (current_phase BETWEEN 0 AND 8), progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
  started_at TEXT NOT NULL, ended_at TEXT, config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE models (id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  phase INTEGER NOT NULL CHECK (phase BETWEEN 1 AND 8), phase_name TEXT NOT NULL, name TEXT NOT NULL,
  path TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, parameter_count INTEGER,
  metrics TEXT NOT NULL DEFAULT '{}', metadata TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
CREATE INDEX idx_models_session ON models(session_id);
CREATE INDEX idx_models_phase ON models(phase);
CREATE INDEX idx_models_created ON models(created_at);
CREATE TABLE model_tags (model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE, tag TEXT NOT NULL,
  PRIMARY KEY (model_id, tag));
CREATE INDEX idx_model_tags_tag ON model_tags(tag);
CREATE TABLE model_parents (model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
  parent_id TEXT NOT NULL REFERENCES models(id) DEFERRABLE INITIALLY DEFERRED, PRIMARY KEY (model_id, parent_id));
CREATE INDEX idx_model_parents_parent ON model_parents(parent_id);
CREATE TABLE phase_handoffs (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL
  REFERENCES sessions(id) ON DELETE CASCADE, source_phase INTEGER NOT NULL, target_phase INTEGER NOT NULL,
  model_ids TEXT NOT NULL DEFAULT '[]', validation_status TEXT NOT NULL CHECK (validation_status IN
  ('passed','failed','pending')), metrics TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
INSERT INTO sessions (id, status, started_at, config) VALUES ('old', 'running', '2024-01-01T00:00:00+00:00', '{"a": 1}');
INSERT INTO models (id, session_id, phase, phase_name, name, path, sha256, size_bytes, parameter_count, created_at)
  VALUES ('m1', 'old', 1, 'cognate', 'a', '/nowhere', 'ab', 10, 5, '2024-01-01T00:00:01+00:00');
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "v1.db"
    raw = _raw(path)                       # created the old way: default journal, auto_vacuum off
    raw.executescript(V1_DDL)
    raw.close()
    assert _raw(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    with ModelRegistry(path) as reg:
        assert reg.open_report == {"upgraded_from": 1, "converted_auto_vacuum": True}
        assert reg.get_session("old")["config"] == {"a": 1}
        assert reg.get_model("m1")["parameter_count"] == 5
        reg.set_session_status("old", "failed", error="killed")           # v2 column
        reg.register_artifact("m1", "cognate-a", "v0")                      # v2 table
        reg.record_phase_result("old", 1, "completed", ["m1"], {"acc": 0.5}, 2.0)
        assert reg.get_session("old")["error"] == "killed"
        assert reg.get_model("m1")["artifacts"][0]["version"] == "v0"
        assert reg.completed_phases("old")[1]["model_ids"] == ["m1"]
        stats = reg.get_storage_stats()
    assert stats["schema_version"] == SCHEMA_VERSION and stats["auto_vacuum"] == 2
    assert _raw(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    raw = _raw(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="newer than this forge"):
        ModelRegistry(path)


# -- sessions -----------------------------------------------------------------------------------
def test_session_lifecycle(reg):
    sid = reg.create_session(None, {"phases": {"phase1": {"steps": 5}}})
    session = reg.get_session(sid)
    assert session["status"] == "running" and session["current_phase"] == 0 and session["ended_at"] is None
    assert session["config"] == {"phases": {"phase1": {"steps": 5}}}
    started = datetime.fromisoformat(session["started_at"])
    assert started.tzinfo is not None and started.utcoffset() == timedelta(0)
    reg.update_session_progress(sid, 2, 37.5)
    reg.set_session_status(sid, "failed", error="phase 2 diverged")
    session = reg.get_session(sid)
    assert (session["current_phase"], session["progress"], session["status"]) == (2, 37.5, "failed")
    assert session["error"] == "phase 2 diverged" and session["ended_at"] >= session["started_at"]
    reg.set_session_status(sid, "running")                                   # resume clears the end
    assert reg.get_session(sid)["ended_at"] is None and reg.get_session(sid)["error"] is None
    other = reg.create_session("second", {})
    assert [s["id"] for s in reg.list_sessions()] == [other, sid]
    reg.set_session_status(other, "completed")
    assert [s["id"] for s in reg.list_sessions(status="completed")] == [other]
    assert reg.get_session("nope") is None


def test_session_bad_input_gets_clear_errors(reg):
    reg.create_session("s", {})
    with pytest.raises(ValueError, match="already exists"):
        reg.create_session("s", {})
    with pytest.raises(ValueError, match="file-name safe"):
        reg.create_session("../s", {})
    with pytest.raises(ValueError, match="running, completed, failed, interrupted"):
        reg.set_session_status("s", "paused")
    with pytest.raises(ValueError, match="unknown session_id 'ghost'"):
        reg.update_session_progress("ghost", 1, 10.0)
    with pytest.raises(ValueError, match="progress_percent"):
        reg.update_session_progress("s", 1, 101.0)
    with pytest.raises(ValueError, match="current_phase"):
        reg.update_session_progress("s", 9, 1.0)
    with pytest.raises(TypeError, match="config must be a dict"):
        reg.create_session("t", [1])
    assert reg.get_session("t") is None


# -- models -------------------------------------------------------------------------------------
def test_register_model_hashes_the_real_file(reg, tmp_path):
    sid = reg.create_session("s", {})
    path = _ckpt(tmp_path, "a", parameter_count=12)
    model_id = reg.register_model(sid, "cognate", "cognate-a", path, {"tokenizer": {"chars": "ab"}}, phase=1,
                                  metrics={"accuracy": 0.9}, tags=["phase1", "best"])
    record = reg.get_model(model_id)
    raw = path.read_bytes()
    assert record["sha256"] == hashlib.sha256(raw).hexdigest() and record["size_bytes"] == len(raw)
    assert record["parameter_count"] == 12 and record["path"] == str(path.resolve())
    assert record["metadata"] == {"tokenizer": {"chars": "ab"}} and record["metrics"] == {"accuracy": 0.9}
    assert record["tags"] == ["best", "phase1"] and record["session_id"] == sid and record["phase"] == 1
    other = reg.register_model(sid, "cognate", "b", _ckpt(tmp_path, "b", seed=1), phase=1)
    assert reg.get_model(other)["parameter_count"] == 12                   # from the checkpoint's sidecar
    assert reg.get_model(other)["sha256"] != record["sha256"]


def test_register_model_bad_input_writes_nothing(reg, tmp_path):
    sid = reg.create_session("s", {})
    path = _ckpt(tmp_path, "a")
    with pytest.raises(ValueError, match="unknown session_id 'ghost'"):
        reg.register_model("ghost", "cognate", "a", path, phase=1)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        reg.register_model(sid, "cognate", "a", tmp_path / "missing.safetensors", phase=1)
    with pytest.raises(ValueError, match="phase"):
        reg.register_model(sid, "cognate", "a", path, phase=9)
    with pytest.raises(TypeError, match="tags"):
        reg.register_model(sid, "cognate", "a", path, phase=1, tags="best")
    with pytest.raises(ValueError, match="metrics"):
        reg.register_model(sid, "cognate", "a", path, phase=1, metrics={"loss": float("nan")})
    with pytest.raises(ValueError, match="unknown parent_ids entry 'ghost'"):
        reg.register_model(sid, "cognate", "a", path, phase=1, parent_ids=["ghost"])
    with pytest.raises(ValueError, match="parameter_count"):
        reg.register_model(sid, "cognate", "a", path, {"parameter_count": -1}, phase=1)
    later = reg.register_model(sid, "evomerge", "m", path, phase=2)
    with pytest.raises(ValueError, match="same or an earlier phase"):
        reg.register_model(sid, "cognate", "a", path, phase=1, parent_ids=[later])
    assert [m["id"] for m in reg.list_models()] == [later]


def test_a_file_swapped_after_saving_is_refused_at_registration(reg, tmp_path):
    sid = reg.create_session("s", {})
    path = _ckpt(tmp_path, "a", seed=0)
    other = _ckpt(tmp_path, "b", seed=1)
    path.write_bytes(other.read_bytes())   # weights replaced, sidecar still describes the original
    with pytest.raises(ChecksumError, match="a.safetensors"):
        reg.register_model(sid, "cognate", "a", path, phase=1)


def test_load_model_verifies_the_recorded_hash(reg, tmp_path):
    sid = reg.create_session("s", {})
    path = _ckpt(tmp_path, "a", seed=3)
    model_id = reg.register_model(sid, "cognate", "a", path, phase=1)
    state, record = reg.load_model(model_id)
    assert torch.equal(state["w"], torch.randn(4, 3, generator=torch.Generator().manual_seed(3)))
    _ckpt(tmp_path, "a", seed=4)           # a different valid checkpoint now sits at the path
    with pytest.raises(ChecksumError, match=str(path.resolve())):
        reg.load_model(model_id)


def test_list_models_filters(reg, tmp_path):
    s1, s2 = reg.create_session("s1", {}), reg.create_session("s2", {})
    a = reg.register_model(s1, "cognate", "a", _ckpt(tmp_path, "a"), phase=1, tags=["x"])
    b = reg.register_model(s1, "evomerge", "b", _ckpt(tmp_path, "b"), phase=2, tags=["x", "champion"])
    c = reg.register_model(s2, "cognate", "c", _ckpt(tmp_path, "c"), phase=1)
    ids = lambda **kw: [m["id"] for m in reg.list_models(**kw)]   # noqa: E731
    assert ids() == [a, c, b]
    assert ids(session_id=s1) == [a, b] and ids(phase=1) == [a, c] and ids(tag="x") == [a, b]
    assert ids(session_id=s1, phase=2, tag="champion") == [b] and ids(session_id="none") == []


def test_lineage_reaches_phase_1_across_parents(reg, tmp_path):
    sid = reg.create_session("s", {})
    path = _ckpt(tmp_path, "w")
    cognates = [reg.register_model(sid, "cognate", n, path, phase=1) for n in "abc"]
    merged = reg.register_model(sid, "evomerge", "gen0", path, phase=2, parent_ids=cognates[:2])
    mutant = reg.register_model(sid, "evomerge", "gen1", path, phase=2, parent_ids=[merged, cognates[2]])
    final = reg.register_model(sid, "quietstar", "q", path, phase=3, parent_ids=[mutant])
    unrelated = reg.register_model(sid, "cognate", "d", path, phase=1)
    chain = reg.lineage(final)
    assert [m["id"] for m in chain[:3]] == [final, mutant, merged]
    assert {m["id"] for m in chain[3:]} == set(cognates) and unrelated not in {m["id"] for m in chain}
    assert [m["phase"] for m in chain] == [3, 2, 2, 1, 1, 1]
    assert [m["id"] for m in reg.lineage(cognates[0])] == [cognates[0]]
    with pytest.raises(ValueError, match="unknown model_id"):
        reg.lineage("ghost")


# -- phases, handoffs, artifacts ----------------------------------------------------------------
def test_phase_results_keep_the_latest_completed_run(reg, tmp_path):
    sid = reg.create_session("s", {})
    a = reg.register_model(sid, "cognate", "a", _ckpt(tmp_path, "a"), phase=1)
    b = reg.register_model(sid, "cognate", "b", _ckpt(tmp_path, "b"), phase=1)
    reg.record_phase_result(sid, 1, "completed", [a], {"acc": 0.5}, 3.0)
    reg.record_phase_result(sid, 2, "failed", [], {}, 1.0)
    reg.record_phase_result(sid, 1, "completed", [b], {"acc": 0.7}, 4.0)   # a rerun replaces it
    done = reg.completed_phases(sid)
    assert list(done) == [1] and done[1]["model_ids"] == [b] and done[1]["metrics"] == {"acc": 0.7}
    with pytest.raises(ValueError, match="unknown model_ids entry 'ghost'"):
        reg.record_phase_result(sid, 2, "completed", ["ghost"], {}, 1.0)
    with pytest.raises(ValueError, match="completed, failed"):
        reg.record_phase_result(sid, 2, "skipped", [], {}, 1.0)
    assert reg.completed_phases("other") == {}


def test_handoffs_and_artifacts(reg, tmp_path):
    sid = reg.create_session("s", {})
    a = reg.register_model(sid, "cognate", "a", _ckpt(tmp_path, "a"), phase=1)
    first = reg.register_phase_handoff(sid, 1, 2, [a], "passed", {"count": 1})
    second = reg.register_phase_handoff(sid, 2, 3, [], "failed", {"reason_code": 2})
    assert second > first
    handoffs = reg.list_phase_handoffs(sid)
    assert [(h["source_phase"], h["target_phase"], h["model_ids"]) for h in handoffs] == [(1, 2, [a]), (2, 3, [])]
    with pytest.raises(ValueError, match="after source_phase"):
        reg.register_phase_handoff(sid, 2, 2, [a], "passed", {})
    with pytest.raises(ValueError, match="passed, failed, pending"):
        reg.register_phase_handoff(sid, 1, 2, [a], "ok", {})
    reg.register_artifact(a, "cognate-a", "v0")
    reg.register_artifact(a, "cognate-a", "v0")
    reg.register_artifact(a, "cognate-a", "v1")
    assert [x["version"] for x in reg.get_model(a)["artifacts"]] == ["v0", "v1"]
    with pytest.raises(ValueError, match="unknown model_id 'ghost'"):
        reg.register_artifact("ghost", "x", "v0")


# -- maintenance --------------------------------------------------------------------------------
def test_incremental_vacuum_shrinks_the_file_after_deletions(reg, tmp_path):
    sid = reg.create_session("bulk", {})
    path = _ckpt(tmp_path, "w")
    for i in range(150):
        reg.register_model(sid, "cognate", f"m{i}", path, {"blob": "x" * 3000}, phase=1, tags=[f"t{i}"])
    reg.set_session_status(sid, "completed")
    reg.checkpoint_wal()
    full = reg.get_storage_stats()
    assert full["tables"]["models"] == 150 and full["tables"]["model_tags"] == 150
    reg.apply_cleanup(CleanupPolicy(max_sessions_total=0, file_root=tmp_path / "elsewhere"))
    reg.checkpoint_wal()
    deleted = reg.get_storage_stats()
    assert deleted["tables"] == {t: 0 for t in deleted["tables"]}          # cascades removed every row
    assert deleted["freelist_count"] > 100 and deleted["db_bytes"] == full["db_bytes"]
    freed = reg.vacuum_incremental(pages=10)
    assert freed == 10 and reg.get_storage_stats()["freelist_count"] == deleted["freelist_count"] - 10
    reg.vacuum_incremental()
    after = reg.get_storage_stats()
    assert after["freelist_count"] == 0 and after["db_bytes"] < full["db_bytes"] // 4
    assert after["wal_bytes"] == 0
    assert reg._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_checkpoint_wal_empties_the_wal(reg):
    reg.create_session("s", {})
    assert reg.get_storage_stats()["wal_bytes"] > 0
    result = reg.checkpoint_wal()
    assert result["busy"] is False and result["wal_bytes_before"] > 0 and result["wal_bytes_after"] == 0
    with pytest.raises(ValueError, match="pages"):
        reg.vacuum_incremental(pages=0)


def test_closed_registry_refuses_work(tmp_path):
    reg = ModelRegistry(tmp_path / "r.db")
    reg.close()
    with pytest.raises(RuntimeError, match="closed"):
        reg.list_sessions()


# -- cleanup ------------------------------------------------------------------------------------
def _backdate(reg, session_id, days):
    when = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="microseconds")
    reg._write(lambda c: c.execute("UPDATE sessions SET started_at = ?, ended_at = CASE WHEN ended_at IS NULL "
                                   "THEN NULL ELSE ? END WHERE id = ?", (when, when, session_id)), "test")


def _session_with_model(reg, folder, sid, status, days_ago, phase=1, parents=()):
    reg.create_session(sid, {})
    model_id = reg.register_model(sid, "p", sid, _ckpt(folder, sid), phase=phase, parent_ids=parents)
    if status != "running":
        reg.set_session_status(sid, status)
    _backdate(reg, sid, days_ago)
    return model_id


def test_cleanup_by_age_deletes_old_finished_sessions_and_their_files_only(reg, tmp_path):
    old = _session_with_model(reg, tmp_path, "old", "completed", 40)
    _session_with_model(reg, tmp_path, "old_running", "running", 40)
    _session_with_model(reg, tmp_path, "recent", "failed", 2)
    stray = tmp_path / "notes.txt"
    stray.write_text("not registered")
    result = reg.apply_cleanup(CleanupPolicy(max_session_age_days=30))
    assert result["sessions_deleted"] == ["old"]
    assert sorted(s["id"] for s in reg.list_sessions()) == ["old_running", "recent"]
    assert reg.get_model(old) is None
    assert not (tmp_path / "old.safetensors").exists() and not (tmp_path / "old.json").exists()
    assert sorted(result["files_deleted"]) == sorted(str((tmp_path / f).resolve())
                                                     for f in ("old.safetensors", "old.json"))
    for kept in ("old_running.safetensors", "recent.safetensors", "recent.json", "notes.txt"):
        assert (tmp_path / kept).exists(), kept


def test_cleanup_by_count_keeps_the_newest_and_never_a_running_session(reg, tmp_path):
    for i, (sid, status) in enumerate([("a", "completed"), ("b", "running"), ("c", "failed"), ("d", "completed")]):
        _session_with_model(reg, tmp_path, sid, status, 10 - i)
    result = reg.apply_cleanup(CleanupPolicy(max_sessions_total=2))
    assert result["sessions_deleted"] == ["a"]                            # b is over the limit but running
    assert sorted(s["id"] for s in reg.list_sessions()) == ["b", "c", "d"]


def test_cleanup_keeps_the_last_n_checkpoints_per_phase(reg, tmp_path):
    sid = reg.create_session("s", {})
    ckpts = [reg.register_model(sid, "cognate", f"step{i}", _ckpt(tmp_path, f"step{i}", seed=i), phase=1,
                                tags=["checkpoint"]) for i in range(5)]
    final = reg.register_model(sid, "cognate", "final", _ckpt(tmp_path, "final"), phase=1)
    p2 = reg.register_model(sid, "evomerge", "p2ck", _ckpt(tmp_path, "p2ck"), phase=2, tags=["checkpoint"])
    result = reg.apply_cleanup(CleanupPolicy(keep_last_n_checkpoints=2))
    assert result["models_deleted"] == sorted(ckpts[:3]) and result["sessions_deleted"] == []
    assert sorted(m["id"] for m in reg.list_models()) == sorted([*ckpts[3:], final, p2])
    for i in range(5):
        assert (tmp_path / f"step{i}.safetensors").exists() == (i >= 3)
        assert (tmp_path / f"step{i}.json").exists() == (i >= 3)


def test_cleanup_never_breaks_lineage_or_phase_outputs(reg, tmp_path):
    old_parent = _session_with_model(reg, tmp_path, "old", "completed", 90)
    reg.create_session("new", {})
    cognates = [reg.register_model("new", "cognate", n, _ckpt(tmp_path, n), phase=1, parent_ids=[old_parent])
                for n in "abc"]
    scratch = reg.register_model("new", "evomerge", "scratch", _ckpt(tmp_path, "scratch"), phase=2)
    champion = reg.register_model("new", "evomerge", "champ", _ckpt(tmp_path, "champ"), phase=2,
                                  parent_ids=cognates)
    output = reg.register_model("new", "evomerge", "output", _ckpt(tmp_path, "output"), phase=2)
    reg.record_phase_result("new", 2, "completed", [output], {}, 1.0)
    newest = reg.register_model("new", "evomerge", "newest", _ckpt(tmp_path, "newest"), phase=2,
                                parent_ids=[champion])
    result = reg.apply_cleanup(CleanupPolicy(max_session_age_days=30, max_models_per_session=1))
    assert result["models_deleted"] == [scratch] and result["sessions_deleted"] == []
    assert set(result["models_protected"]) >= {old_parent, champion, output, *cognates}
    assert [m["phase"] for m in reg.lineage(newest)][-1] == 1 and reg.get_model(old_parent) is not None
    assert not (tmp_path / "scratch.safetensors").exists() and (tmp_path / "champ.safetensors").exists()


def test_cleanup_leaves_files_outside_the_root_and_shared_files(reg, tmp_path):
    inside, outside = tmp_path / "runs", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    reg.create_session("s", {})
    shared = _ckpt(inside, "shared")
    reg.register_model("s", "p", "a", shared, phase=1, tags=["checkpoint"])
    reg.register_model("s", "p", "b", _ckpt(outside, "foreign"), phase=1, tags=["checkpoint"])
    keep = reg.register_model("s", "p", "c", shared, phase=1, tags=["checkpoint"])
    result = reg.apply_cleanup(CleanupPolicy(keep_last_n_checkpoints=1, file_root=inside))
    assert len(result["models_deleted"]) == 2 and [m["id"] for m in reg.list_models()] == [keep]
    assert shared.exists() and (outside / "foreign.safetensors").exists()
    assert result["files_deleted"] == [] and "outside" in result["files_skipped"][0]


def test_cleanup_policy_validation():
    with pytest.raises(ValueError, match="max_sessions_total"):
        CleanupPolicy(max_sessions_total=-1)
    with pytest.raises(ValueError, match="max_session_age_days"):
        CleanupPolicy(max_session_age_days=float("inf"))
    with pytest.raises(ValueError, match="keep_last_n_checkpoints"):
        CleanupPolicy(keep_last_n_checkpoints=2.5)
