"""What the dashboard reads: the registry (read-only), each session's metrics.jsonl and checkpoint sidecars.

Every problem a person can cause or meet (no run root, no registry, a file that is not a registry, a
corrupted one, a metrics file cut short by a kill) becomes a `DashboardDataError` with a sentence saying
what is wrong and what to do, which the pages show instead of a traceback.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from forge.phase_table import PHASE_NAMES
from forge.registry.checkpoint import file_sha256, metadata_path_for
from forge.registry.registry import safe_name
from forge.tracking.metrics import flat_numbers  # noqa: F401 (the views read it from here)
from forge.registry.schema import SQLITE_HEADER
from forge.tracking.tracker import METRICS_FILE

REGISTRY_FILE = "registry.db"
MAX_SIDECAR_BYTES = 8 << 20


class DashboardDataError(Exception):
    """A run root, registry or metrics file the dashboard cannot read; the message says why and what to do."""


def registry_path(run_root: str | Path) -> Path:
    return Path(run_root) / REGISTRY_FILE


def check_run_root(run_root: str | Path) -> Path:
    """The run root as a Path, or DashboardDataError when it is missing or holds no registry yet."""
    root = Path(run_root).expanduser()
    if not root.is_dir():
        raise DashboardDataError(f"run root {root} does not exist; start a run (`forge run`) or pass "
                                 "`forge ui --run-root <folder of your runs>`")
    path = registry_path(root)
    if not path.is_file() or path.stat().st_size == 0:
        raise DashboardDataError(f"run root {root} has no registry ({REGISTRY_FILE}) yet: no run has "
                                 "been started with this run_root")
    return root


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection (SQLite URI mode=ro): it can never write, lock for writing, or create the file."""
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise DashboardDataError(f"{path} is not a forge registry (not an SQLite database); move it away "
                                     "or point --run-root elsewhere")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("SELECT count(*) FROM sessions").fetchone()
    except sqlite3.DatabaseError as error:
        raise unreadable(path, error) from None
    if version < 2:
        conn.close()
        raise DashboardDataError(f"{path} has registry schema version {version}; open it once with forge "
                                 "(`forge status`) to upgrade it")
    return conn


def unreadable(path: Path, error: sqlite3.DatabaseError) -> DashboardDataError:
    return DashboardDataError(f"the registry {path} cannot be read ({error}); it is corrupted or not a forge "
                              "registry: restore it from a backup or move it away")


@dataclass
class RunRoot:
    """One run root opened for reading: its folder and a read-only registry connection."""
    root: Path
    conn: sqlite3.Connection = field(repr=False)

    @classmethod
    def open(cls, run_root: str | Path) -> RunRoot:
        root = check_run_root(run_root)
        return cls(root, connect_read_only(registry_path(root)))

    def close(self) -> None:
        self.conn.close()

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        """Rows as dicts; a database error (corruption found mid-read) becomes DashboardDataError."""
        try:
            return [dict(row) for row in self.conn.execute(sql, params).fetchall()]
        except sqlite3.DatabaseError as error:
            raise unreadable(registry_path(self.root), error) from None

    def session_dir(self, session_id: str) -> Path:
        return self.root / safe_name(session_id)


def _json(text: str | None, default):
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


# -- sessions ------------------------------------------------------------------------------------------
def list_sessions(run: RunRoot) -> list[dict]:
    """Sessions, newest first, with their planned phases and wall time per completed phase (one query each)."""
    sessions = run.query("SELECT id, status, current_phase, progress, started_at, ended_at, error, config "
                         "FROM sessions ORDER BY started_at DESC, rowid DESC")
    durations: dict[str, dict[int, float]] = {}
    for row in run.query("SELECT session_id, phase, duration_s FROM phase_results WHERE status = 'completed' "
                         "ORDER BY id"):
        durations.setdefault(row["session_id"], {})[row["phase"]] = row["duration_s"]
    for session in sessions:
        config = _json(session.pop("config"), {})
        session["plan"] = (config.get("plan") or {}).get("phases", [])
        session["phase_seconds"] = durations.get(session["id"], {})
    return sessions


def session_config(run: RunRoot, session_id: str) -> dict:
    rows = run.query("SELECT config FROM sessions WHERE id = ?", (session_id,))
    if not rows:
        raise DashboardDataError(f"unknown session {session_id!r}")
    return _json(rows[0]["config"], {})


def phase_strip(run: RunRoot, session: dict) -> list[dict]:
    """One entry per phase of the table: status done / failed (with the reason) / running / not run."""
    latest: dict[int, dict] = {}
    for row in run.query("SELECT phase, status, metrics, duration_s, recorded_at FROM phase_results "
                         "WHERE session_id = ? ORDER BY id", (session["id"],)):
        latest[row["phase"]] = row
    strip = []
    for phase, name in PHASE_NAMES.items():
        row = latest.get(phase)
        entry = {"phase": phase, "name": name, "status": "not run", "reason": "", "duration_s": None}
        if row is not None and row["status"] == "completed":
            entry.update(status="done", duration_s=row["duration_s"])
        elif row is not None:
            entry.update(status="failed", reason=_json(row["metrics"], {}).get("error", ""),
                         duration_s=row["duration_s"])
        if session["status"] == "running" and entry["status"] != "done" and _is_next(phase, latest, session):
            entry.update(status="running", reason="")
        strip.append(entry)
    return strip


def _is_next(phase: int, latest: dict, session: dict) -> bool:
    """The phase a running session is in: the first planned phase without a completed result."""
    plan = session.get("plan") or list(PHASE_NAMES)
    pending = [p for p in plan if latest.get(p, {}).get("status") != "completed"]
    return bool(pending) and pending[0] == phase


def phase_results(run: RunRoot, session_id: str, phase: int) -> dict | None:
    """The latest completed result of one phase: metrics, model ids, duration; None when it has none."""
    rows = run.query("SELECT metrics, model_ids, duration_s, recorded_at FROM phase_results WHERE session_id = ? "
                     "AND phase = ? AND status = 'completed' ORDER BY id DESC LIMIT 1", (session_id, phase))
    if not rows:
        return None
    row = rows[0]
    return {"metrics": _json(row["metrics"], {}), "model_ids": _json(row["model_ids"], []),
            "duration_s": row["duration_s"], "recorded_at": row["recorded_at"]}


def handoffs(run: RunRoot, session_id: str) -> list[dict]:
    rows = run.query("SELECT source_phase, target_phase, validation_status, metrics, model_ids, created_at "
                     "FROM phase_handoffs WHERE session_id = ? ORDER BY id", (session_id,))
    for row in rows:
        row["metrics"] = _json(row["metrics"], {})
        row["model_ids"] = _json(row["model_ids"], [])
    return rows


def final_models(run: RunRoot, session_id: str) -> list[dict]:
    """The models of the session's last completed phase."""
    rows = run.query("SELECT phase, model_ids FROM phase_results WHERE session_id = ? AND status = 'completed' "
                     "ORDER BY phase DESC, id DESC LIMIT 1", (session_id,))
    if not rows:
        return []
    ids = _json(rows[0]["model_ids"], [])
    return [m for m in (get_model(run, model_id) for model_id in ids) if m is not None]


# -- models --------------------------------------------------------------------------------------------
MODEL_COLUMNS = ("id, session_id, phase, phase_name, name, path, sha256, size_bytes, parameter_count, metrics, "
                 "metadata, created_at")


def _model(row: dict) -> dict:
    row["metrics"] = _json(row["metrics"], {})
    row["metadata"] = _json(row["metadata"], {})
    return row


def list_models(run: RunRoot, session_id: str | None = None) -> list[dict]:
    where, params = ("WHERE session_id = ?", (session_id,)) if session_id else ("", ())
    return [_model(r) for r in run.query(f"SELECT {MODEL_COLUMNS} FROM models {where} "
                                         "ORDER BY created_at DESC, rowid DESC", params)]


def get_model(run: RunRoot, model_id: str) -> dict | None:
    rows = run.query(f"SELECT {MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,))
    return _model(rows[0]) if rows else None


def lineage_edges(run: RunRoot, model_id: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(models, (parent, child) edges) of this model and all its ancestors, back to Phase 1."""
    rows = run.query("WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT p.parent_id FROM model_parents p "
                     "JOIN up ON p.model_id = up.id) SELECT p.parent_id, p.model_id FROM model_parents p "
                     "WHERE p.model_id IN (SELECT id FROM up)", (model_id,))
    edges = [(r["parent_id"], r["model_id"]) for r in rows]
    ids = {model_id, *(p for p, _ in edges)}
    models = [m for m in (get_model(run, i) for i in sorted(ids)) if m is not None]
    return models, edges


def read_sidecar(model_path: str | Path) -> dict | None:
    """The checkpoint's JSON sidecar (config, tokenizer, metadata), None when absent."""
    path = metadata_path_for(Path(model_path))
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise DashboardDataError(f"{path} is larger than {MAX_SIDECAR_BYTES} bytes; not a forge sidecar")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DashboardDataError(f"{path} is not valid JSON ({error}); it was edited or damaged") from None


def verify_model(model: dict) -> tuple[bool, str]:
    """(matches, message): re-hash the model file and compare with the registry's sha256."""
    path = Path(model["path"])
    if not path.is_file():
        return False, f"the file {path} is missing"
    sha256, size = file_sha256(path)
    if sha256 != model["sha256"]:
        return False, f"sha256 {sha256} differs from the registry's {model['sha256']}: the file was changed"
    return True, f"sha256 {sha256} matches the registry ({size:,} bytes)"


# -- metrics.jsonl ---------------------------------------------------------------------------------------
@dataclass
class MetricsFile:
    records: list[dict]
    problems: list[str]
    path: Path


def read_metrics_file(run: RunRoot, session_id: str) -> MetricsFile:
    """Every readable line of the session's metrics.jsonl; unreadable lines (a line cut short by a kill)
    are skipped and named in `problems`."""
    path = run.session_dir(session_id) / METRICS_FILE
    records, problems = [], []
    if not path.is_file():
        return MetricsFile(records, problems, path)
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"{path} line {number} is not complete JSON (cut short?); it was skipped")
                continue
            if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
                records.append(record)
            else:
                problems.append(f"{path} line {number} is not a metrics record; it was skipped")
    return MetricsFile(records, problems, path)


def metric_points(records: list[dict], phase: int) -> list[dict]:
    """Long form (step, time, metric, value) of one phase's logged values; nulls (NaN/inf) are dropped."""
    points = []
    for record in records:
        if record.get("phase") != phase:
            continue
        for name, value in record["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.append({"step": record.get("step"), "time": record.get("time"), "metric": name,
                               "value": float(value)})
    return points


def flat_values(metrics: dict, prefix: str = "") -> dict:
    """Nested values as one level of 'a/b' keys, every leaf kept (a handoff's numbers and its error text)."""
    out: dict = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat_values(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- system ------------------------------------------------------------------------------------------------
def disk_usage(path: Path) -> dict:
    usage = shutil.disk_usage(path)
    return {"total": usage.total, "used": usage.used, "free": usage.free}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
