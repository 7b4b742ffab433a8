"""Minimal stand-ins for forge.registry and forge.tracking (written in parallel by other helpers),
implementing the brief's signatures with real SQLite, safetensors and JSON-lines files.
`install()` puts them in sys.modules ONLY when the real package is missing; once the real modules
are merged these are unused."""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import sys
import time
import types
from pathlib import Path


class ChecksumError(ValueError):
    pass


class CheckpointInfo:
    def __init__(self, path, sha256, size):
        self.path, self.sha256, self.size_bytes = path, sha256, size


def save_checkpoint(state_dict, path, metadata):
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(tmp))
    tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({"sha256": digest, "metadata": metadata}))
    return CheckpointInfo(path, digest, path.stat().st_size)


def load_checkpoint(path, expected_sha256=None):
    from safetensors.torch import load as load_bytes
    path = Path(path)
    data = path.read_bytes()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    actual = hashlib.sha256(data).hexdigest()
    for expected in (expected_sha256, sidecar["sha256"]):
        if expected is not None and actual != expected:
            raise ChecksumError(f"checkpoint {path} has sha256 {actual}, expected {expected}")
    return load_bytes(data), sidecar["metadata"]


def new_session_id(prefix="session"):
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, status TEXT, current_phase INT, progress REAL,
  started_at TEXT, config TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, session_id TEXT, phase INT, phase_name TEXT, name TEXT,
  path TEXT, sha256 TEXT, metrics TEXT, metadata TEXT, tags TEXT, parent_ids TEXT);
CREATE TABLE IF NOT EXISTS phase_results (id INTEGER PRIMARY KEY, session_id TEXT, phase INT, status TEXT,
  model_ids TEXT, metrics TEXT, duration_s REAL);
CREATE TABLE IF NOT EXISTS handoffs (id INTEGER PRIMARY KEY, session_id TEXT, source INT, target INT,
  model_ids TEXT, status TEXT, metrics TEXT);
CREATE TABLE IF NOT EXISTS artifacts (model_id TEXT, name TEXT, version TEXT);
"""


class ModelRegistry:
    def __init__(self, path, timeout=30.0):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(_SCHEMA)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.conn.close()

    def create_session(self, session_id, config):
        self.conn.execute("INSERT INTO sessions VALUES (?, 'running', 0, 0, ?, ?, NULL)",
                          (session_id, f"{time.time():.6f}", json.dumps(config)))
        return session_id

    def update_session_progress(self, session_id, current_phase, progress_percent):
        self.conn.execute("UPDATE sessions SET current_phase=?, progress=? WHERE id=?",
                          (current_phase, progress_percent, session_id))

    def set_session_status(self, session_id, status, error=None):
        self.conn.execute("UPDATE sessions SET status=?, error=? WHERE id=?", (status, error, session_id))

    def _session(self, row):
        return {**dict(row), "config": json.loads(row["config"])}

    def get_session(self, session_id):
        row = self.conn.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        return None if row is None else self._session(row)

    def list_sessions(self, status=None):
        rows = self.conn.execute("SELECT * FROM sessions ORDER BY started_at DESC, rowid DESC").fetchall()
        return [self._session(r) for r in rows if status is None or r["status"] == status]

    def register_model(self, session_id, phase_name, model_name, model_path, metadata=None, *, phase,
                       metrics=None, tags=(), parent_ids=()):
        path = Path(model_path).resolve()
        model_id = f"p{phase}-{model_name}-{secrets.token_hex(6)}"
        self.conn.execute("INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
            model_id, session_id, phase, phase_name, model_name, str(path),
            hashlib.sha256(path.read_bytes()).hexdigest(), json.dumps(metrics or {}), json.dumps(metadata or {}),
            json.dumps(sorted(tags)), json.dumps(sorted(parent_ids))))
        return model_id

    def _model(self, row):
        out = dict(row)
        for key in ("metrics", "metadata", "tags", "parent_ids"):
            out[key] = json.loads(out[key])
        return out

    def get_model(self, model_id):
        row = self.conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        return None if row is None else self._model(row)

    def list_models(self, session_id=None, phase=None, tag=None):
        rows = self.conn.execute("SELECT * FROM models ORDER BY phase, rowid").fetchall()
        return [self._model(r) for r in rows if (session_id is None or r["session_id"] == session_id)
                and (phase is None or r["phase"] == phase) and (tag is None or tag in json.loads(r["tags"]))]

    def record_phase_result(self, session_id, phase, status, model_ids, metrics, duration_s):
        self.conn.execute("INSERT INTO phase_results (session_id, phase, status, model_ids, metrics, duration_s) "
                          "VALUES (?,?,?,?,?,?)", (session_id, phase, status, json.dumps(model_ids),
                                                   json.dumps(metrics), duration_s))

    def completed_phases(self, session_id):
        out = {}
        for row in self.conn.execute("SELECT * FROM phase_results WHERE session_id=? AND status='completed' "
                                     "ORDER BY id", (session_id,)):
            out[row["phase"]] = {"model_ids": json.loads(row["model_ids"]), "metrics": json.loads(row["metrics"]),
                                 "duration_s": row["duration_s"]}
        return dict(sorted(out.items()))

    def register_phase_handoff(self, session_id, source_phase, target_phase, model_ids, validation_status, metrics):
        return self.conn.execute("INSERT INTO handoffs (session_id, source, target, model_ids, status, metrics) "
                                 "VALUES (?,?,?,?,?,?)", (session_id, source_phase, target_phase,
                                                          json.dumps(model_ids), validation_status,
                                                          json.dumps(metrics))).lastrowid

    def list_phase_handoffs(self, session_id):
        rows = self.conn.execute("SELECT * FROM handoffs WHERE session_id=? ORDER BY id", (session_id,))
        return [dict(r) for r in rows]

    def register_artifact(self, model_id, name, version):
        self.conn.execute("INSERT INTO artifacts VALUES (?,?,?)", (model_id, name, version))


class Tracker:
    def __init__(self, session_dir, session_id, mode="offline", project="agent-forge"):
        self.path = Path(session_dir) / "metrics.jsonl"
        self.phase = None

    def start_phase(self, phase, name, config):
        self.phase = phase

    def log(self, metrics, step=None):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"phase": self.phase, "step": step, **metrics}) + "\n")

    def log_model_artifact(self, path, name, metadata):
        return None

    def finish_phase(self):
        self.phase = None

    def close(self):
        pass


def install() -> bool:
    """Register the stand-ins as forge.registry / forge.tracking when those are missing."""
    import forge
    installed = False
    try:
        import forge.registry  # noqa: F401
    except ModuleNotFoundError:
        registry = types.ModuleType("forge.registry")
        checkpoint = types.ModuleType("forge.registry.checkpoint")
        for name in ("save_checkpoint", "load_checkpoint", "ChecksumError", "CheckpointInfo"):
            setattr(checkpoint, name, globals()[name])
            setattr(registry, name, globals()[name])
        registry.ModelRegistry, registry.new_session_id, registry.checkpoint = ModelRegistry, new_session_id, checkpoint
        sys.modules.update({"forge.registry": registry, "forge.registry.checkpoint": checkpoint})
        forge.registry = registry
        installed = True
    try:
        import forge.tracking  # noqa: F401
    except ModuleNotFoundError:
        tracking = types.ModuleType("forge.tracking")
        tracking.Tracker = Tracker
        sys.modules["forge.tracking"] = tracking
        forge.tracking = tracking
        installed = True
    return installed
