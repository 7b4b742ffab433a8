"""SQLite model registry: sessions, models with hashes and lineage, phase results, handoffs, artifacts.

One connection per registry object, in WAL mode with foreign keys on. Every write is one short
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock
upgrading read locks), retried with backoff while another process holds the lock. Open a new
``ModelRegistry`` in each process; an object inherited through ``fork`` refuses to run.
Method names follow the original system's registry (create_session, register_model, ...) so its users can switch.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from forge._checks import check_finite_number, check_positive_int
from forge.registry import schema
from forge.registry.checkpoint import ChecksumError, file_sha256, load_checkpoint, read_sidecar
from forge.registry.cleanup import CleanupPolicy, delete_files, delete_planned, plan_cleanup

T = TypeVar("T")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 128
_MODEL_COLUMNS = ("id, session_id, phase, phase_name, name, path, sha256, size_bytes, parameter_count, "
                  "metrics, metadata, created_at")


def safe_name(value: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-name-safe form of an id or name: characters outside [A-Za-z0-9._-] become '_', no leading or
    trailing '.', '_' or '-' (so never '..', a hidden file or a name Windows trims), at most max_length
    characters. The one sanitizer of names that become paths (registry ids, session folders, model files)."""
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, got {type(value).__name__}")
    cleaned = _UNSAFE.sub("_", value).strip("._-")[:max_length].rstrip("._-")
    if not cleaned:
        raise ValueError(f"cannot make a file name from {value!r}: nothing is left after "
                         "removing characters outside [A-Za-z0-9._-]")
    return cleaned


def utc_now() -> str:
    """UTC time as ISO 8601 with microseconds; strings in this format sort chronologically."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_session_id(prefix: str = "session") -> str:
    """session_YYYYmmdd_HHMMSS_<8 hex>: sortable by start time, unique within one second
    (the original system's second-resolution ids collided)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    return f"{safe_name(prefix)}_{stamp}_{secrets.token_hex(4)}"


def _to_json(field: str, value: Any, kind: type) -> str:
    if not isinstance(value, kind):
        raise TypeError(f"{field} must be a {kind.__name__}, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field} must be JSON-serializable without NaN/inf: {error}") from error


def _check_text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty str, got {value!r}")
    return value


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"Invalid {field}: {value!r}; expected one of {', '.join(allowed)}")
    return value


def _check_phase(field: str, value: Any, low: int = schema.PHASES.start) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < schema.PHASES.stop:
        raise ValueError(f"Invalid {field}: {value!r}; expected an integer in {low}..{schema.PHASES.stop - 1}")
    return value


def _check_id_list(field: str, values: Any) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{field} must be a list of ids, got {type(values).__name__}")
    values = list(values)
    for value in values:
        _check_text(f"{field} entry", value)
    return values


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file, None when it is gone: tells a deleted or replaced database."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _session_dict(row: sqlite3.Row) -> dict:
    record = dict(row)
    record["config"] = json.loads(record["config"])
    return record


class ModelRegistry:
    """The registry database at ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
        self.timeout = check_finite_number("timeout", timeout, low=0.0, low_open=True)
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise schema.RegistryIOError(f"registry {self.path}: cannot create its folder ({error.strerror}); "
                                         "point registry.path at a file in a folder this user can write") from None
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None
        self._conn, self.open_report = schema.connect(self.path, self.timeout)
        self._conn.row_factory = sqlite3.Row
        self._identity = _file_identity(self.path)

    # -- plumbing -------------------------------------------------------------------------------
    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints and removes the WAL file)."""
        with self._lock:
            if self._conn is not None and os.getpid() == self._pid:
                self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"registry {self.path} is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("this ModelRegistry was opened in another process; "
                               "open a new ModelRegistry(path) in each process")
        return self._conn

    def _check_same_file(self, what: str) -> None:
        """Refuse to write once the database file was deleted or replaced: SQLite would keep writing into
        the unlinked file and every later write would be silently lost."""
        if _file_identity(self.path) != self._identity:
            raise schema.RegistryIOError(
                f"registry {self.path}: {what} refused: the database file was deleted or replaced while this "
                "process had it open, so what is written now would be lost. Restore it from a backup, or "
                "start over with a new registry (the checkpoints under the run root are untouched)")

    def _write(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run fn(conn) in one BEGIN IMMEDIATE transaction, retried while the database is busy; an SQLite
        failure (disk full, I/O error) becomes a RegistryIOError naming the file."""
        self._check_same_file(what)

        def attempt() -> T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                schema.rollback(conn)
                raise
        with self._lock:
            try:
                return schema.with_retry(attempt, self.timeout, what)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as error:
                raise schema.io_error(self.path, what, error) from error

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in one read transaction, so multi-query reads see one snapshot."""
        def attempt() -> T:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                schema.rollback(conn)
        with self._lock:
            try:
                return schema.with_retry(attempt, self.timeout, "read")
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as error:
                raise schema.io_error(self.path, "read", error) from error

    @staticmethod
    def _require(conn: sqlite3.Connection, table: str, key: str, field: str, value: str) -> None:
        if conn.execute(f"SELECT 1 FROM {table} WHERE {key} = ?", (value,)).fetchone() is None:
            raise ValueError(f"unknown {field} {value!r}")

    # -- sessions -------------------------------------------------------------------------------
    def create_session(self, session_id: str | None, config: dict) -> str:
        """Start a session (status 'running', phase 0, 0 %). None makes a fresh id."""
        session_id = new_session_id() if session_id is None else _check_text("session_id", session_id)
        if safe_name(session_id) != session_id:
            raise ValueError(f"session_id {session_id!r} is not file-name safe (it names the session "
                             f"folder); use new_session_id() or safe_name(), e.g. {safe_name(session_id)!r}")
        config_json = _to_json("config", config, dict)

        def insert(conn: sqlite3.Connection) -> str:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise ValueError(f"session_id {session_id!r} already exists; use new_session_id()")
            conn.execute("INSERT INTO sessions (id, status, current_phase, progress, started_at, config) "
                         "VALUES (?, 'running', 0, 0, ?, ?)", (session_id, utc_now(), config_json))
            return session_id
        return self._write(insert, "create_session")

    def update_session_progress(self, session_id: str, current_phase: int, progress_percent: float) -> None:
        """Record the phase being run (0 = none yet) and the overall progress in percent."""
        _check_phase("current_phase", current_phase, low=0)
        progress = check_finite_number("progress_percent", progress_percent, 0.0, 100.0)
        self._update_session(session_id, "current_phase = ?, progress = ?", (current_phase, progress))

    def set_session_status(self, session_id: str, status: str, error: str | None = None) -> None:
        """Set the status; a final status (completed/failed/interrupted) sets ended_at, running clears it."""
        _check_choice("status", status, schema.SESSION_STATUSES)
        if error is not None and not isinstance(error, str):
            raise TypeError(f"error must be a str or None, got {type(error).__name__}")
        ended_at = utc_now() if status in schema.FINAL_STATUSES else None
        self._update_session(session_id, "status = ?, ended_at = ?, error = ?", (status, ended_at, error))

    def _update_session(self, session_id: str, assignments: str, values: tuple) -> None:
        _check_text("session_id", session_id)

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?", (*values, session_id))
            if cursor.rowcount == 0:
                raise ValueError(f"unknown session_id {session_id!r}")
        self._write(update, "session update")

    def get_session(self, session_id: str) -> dict | None:
        row = self._read(lambda c: c.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return None if row is None else _session_dict(row)

    def list_sessions(self, status: str | None = None) -> list[dict]:
        """Sessions, newest first; optionally only those with the given status."""
        sql, params = "SELECT * FROM sessions", ()
        if status is not None:
            _check_choice("status", status, schema.SESSION_STATUSES)
            sql, params = sql + " WHERE status = ?", (status,)
        rows = self._read(lambda c: c.execute(sql + " ORDER BY started_at DESC, rowid DESC", params).fetchall())
        return [_session_dict(row) for row in rows]

    # -- models ---------------------------------------------------------------------------------
    def register_model(self, session_id: str, phase_name: str, model_name: str, model_path: str | Path,
                       metadata: dict | None = None, *, phase: int, metrics: dict | None = None,
                       tags: Iterable[str] = (), parent_ids: Iterable[str] = ()) -> str:
        """Record a model file: hashes it (sha256, streamed) and stores size, parameter_count
        (metadata["parameter_count"], else the checkpoint's JSON sidecar), tags and parents.
        Returns the new model id."""
        _check_text("session_id", session_id)
        _check_text("phase_name", phase_name)
        _check_text("model_name", model_name)
        _check_phase("phase", phase)
        metadata = {} if metadata is None else metadata
        row = {"session_id": session_id, "phase": phase, "phase_name": phase_name, "name": model_name,
               "metadata": _to_json("metadata", metadata, dict),
               "metrics": _to_json("metrics", {} if metrics is None else metrics, dict)}
        tags = sorted(set(_check_id_list("tags", tags)))
        parent_ids = sorted(set(_check_id_list("parent_ids", parent_ids)))
        row.update(self._describe_file(model_path, metadata))
        row["id"] = f"p{phase}-{safe_name(model_name, 48)}-{secrets.token_hex(6)}"
        row["created_at"] = utc_now()

        def insert(conn: sqlite3.Connection) -> str:
            self._require(conn, "sessions", "id", "session_id", session_id)
            self._check_parents(conn, parent_ids, phase)
            conn.execute(f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                         [row[c.strip()] for c in _MODEL_COLUMNS.split(",")])
            conn.executemany("INSERT INTO model_tags (model_id, tag) VALUES (?, ?)",
                             [(row["id"], tag) for tag in tags])
            conn.executemany("INSERT INTO model_parents (model_id, parent_id) VALUES (?, ?)",
                             [(row["id"], parent) for parent in parent_ids])
            return row["id"]
        return self._write(insert, "register_model")

    @staticmethod
    def _describe_file(model_path: str | Path, metadata: dict) -> dict:
        """path (absolute), sha256, size_bytes and parameter_count of a model file, checked
        against its checkpoint sidecar when there is one (catches a file swapped after saving)."""
        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a str or Path, got {type(model_path).__name__}")
        path = Path(model_path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model_path {path} does not exist or is not a file")
        sha256, size = file_sha256(path)
        sidecar = read_sidecar(path) if path.suffix == ".safetensors" else None
        if sidecar is not None and sidecar["sha256"] != sha256:
            raise ChecksumError(f"model file {path} has sha256 {sha256}, but its metadata file records "
                                f"{sidecar['sha256']}: the file was replaced or corrupted after saving")
        count = metadata.get("parameter_count", (sidecar or {}).get("parameter_count"))
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ValueError(f"metadata['parameter_count'] must be an integer >= 0, got {count!r}")
        return {"path": str(path), "sha256": sha256, "size_bytes": size, "parameter_count": count}

    def _check_parents(self, conn: sqlite3.Connection, parent_ids: list[str], phase: int) -> None:
        for parent in parent_ids:
            found = conn.execute("SELECT phase FROM models WHERE id = ?", (parent,)).fetchone()
            if found is None:
                raise ValueError(f"unknown parent_ids entry {parent!r}")
            if found[0] > phase:
                raise ValueError(f"parent {parent!r} is from phase {found[0]}, after this model's phase "
                                 f"{phase}; a parent must come from the same or an earlier phase")

    def _model_dicts(self, conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[dict]:
        out = []
        for row in rows:
            record = dict(row)
            record["metrics"] = json.loads(record["metrics"])
            record["metadata"] = json.loads(record["metadata"])
            key = (record["id"],)
            record["tags"] = [r[0] for r in conn.execute(
                "SELECT tag FROM model_tags WHERE model_id = ? ORDER BY tag", key)]
            record["parent_ids"] = [r[0] for r in conn.execute(
                "SELECT parent_id FROM model_parents WHERE model_id = ? ORDER BY parent_id", key)]
            record["artifacts"] = [dict(r) for r in conn.execute(
                "SELECT name, version, created_at FROM artifacts WHERE model_id = ? ORDER BY id", key)]
            out.append(record)
        return out

    def get_model(self, model_id: str) -> dict | None:
        """The model's record (with tags, parent_ids, artifacts), or None."""
        def read(conn: sqlite3.Connection) -> list[dict]:
            rows = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchall()
            return self._model_dicts(conn, rows)
        found = self._read(read)
        return found[0] if found else None

    def list_models(self, session_id: str | None = None, phase: int | None = None,
                    tag: str | None = None) -> list[dict]:
        """Models matching every filter given, ordered by phase then registration time."""
        clauses, params = [], []
        if session_id is not None:
            clauses.append("session_id = ?")
            params.append(session_id)
        if phase is not None:
            clauses.append("phase = ?")
            params.append(_check_phase("phase", phase))
        if tag is not None:
            clauses.append("id IN (SELECT model_id FROM model_tags WHERE tag = ?)")
            params.append(tag)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_MODEL_COLUMNS} FROM models{where} ORDER BY phase, created_at, rowid"
        return self._read(lambda conn: self._model_dicts(conn, conn.execute(sql, params).fetchall()))

    def superseded_ids(self) -> set[str]:
        """Ids of models a rerun of their phase replaced (schema.superseded_model_ids)."""
        return self._read(schema.superseded_model_ids)

    def lineage(self, model_id: str) -> list[dict]:
        """This model and all its ancestors, nearest first, back to Phase 1."""
        sql = ("WITH RECURSIVE ancestry(id, depth) AS (SELECT ?, 0 UNION "
               "SELECT p.parent_id, a.depth + 1 FROM model_parents p JOIN ancestry a ON p.model_id = a.id) "
               f"SELECT {', '.join('m.' + c.strip() for c in _MODEL_COLUMNS.split(','))} "
               "FROM models m JOIN (SELECT id, MIN(depth) AS depth FROM ancestry GROUP BY id) a "
               "ON m.id = a.id ORDER BY a.depth, m.phase DESC, m.created_at, m.id")

        def read(conn: sqlite3.Connection) -> list[dict]:
            self._require(conn, "models", "id", "model_id", model_id)
            return self._model_dicts(conn, conn.execute(sql, (model_id,)).fetchall())
        return self._read(read)

    def load_model(self, model_id: str) -> tuple[dict, dict]:
        """(state_dict, record) of a registered checkpoint, refused if its sha256 changed."""
        record = self.get_model(model_id)
        if record is None:
            raise ValueError(f"unknown model_id {model_id!r}")
        state_dict, _ = load_checkpoint(Path(record["path"]), expected_sha256=record["sha256"])
        return state_dict, record

    # -- phases, handoffs, artifacts ------------------------------------------------------------
    def record_phase_result(self, session_id: str, phase: int, status: str, model_ids: list[str],
                            metrics: dict, duration_s: float) -> None:
        """Record how a phase ended and which models it produced (resume reads this)."""
        _check_text("session_id", session_id)
        _check_phase("phase", phase)
        _check_choice("status", status, schema.PHASE_RESULT_STATUSES)
        model_ids = _check_id_list("model_ids", model_ids)
        values = (session_id, phase, status, json.dumps(model_ids), _to_json("metrics", metrics, dict),
                  check_finite_number("duration_s", duration_s, low=0.0), utc_now())

        def insert(conn: sqlite3.Connection) -> None:
            self._require(conn, "sessions", "id", "session_id", session_id)
            for model_id in model_ids:
                self._require(conn, "models", "id", "model_ids entry", model_id)
            conn.execute("INSERT INTO phase_results (session_id, phase, status, model_ids, metrics, "
                         "duration_s, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
        self._write(insert, "record_phase_result")

    def completed_phases(self, session_id: str) -> dict[int, dict]:
        """phase -> {model_ids, metrics, duration_s, recorded_at} of its latest completed result."""
        rows = self._read(lambda conn: schema.completed_phase_rows(conn, session_id))
        return {phase: {"model_ids": json.loads(row["model_ids"]), "metrics": json.loads(row["metrics"]),
                        "duration_s": row["duration_s"], "recorded_at": row["recorded_at"]}
                for (_, phase), row in sorted(rows.items())}

    def register_phase_handoff(self, session_id: str, source_phase: int, target_phase: int,
                               model_ids: list[str], validation_status: str, metrics: dict) -> int:
        """Record a checked handoff between phases; returns its id."""
        _check_text("session_id", session_id)
        _check_phase("source_phase", source_phase)
        _check_phase("target_phase", target_phase)
        if target_phase <= source_phase:
            raise ValueError(f"target_phase ({target_phase}) must come after source_phase ({source_phase})")
        _check_choice("validation_status", validation_status, schema.HANDOFF_STATUSES)
        model_ids = _check_id_list("model_ids", model_ids)
        values = (session_id, source_phase, target_phase, json.dumps(model_ids), validation_status,
                  _to_json("metrics", metrics, dict), utc_now())

        def insert(conn: sqlite3.Connection) -> int:
            self._require(conn, "sessions", "id", "session_id", session_id)
            for model_id in model_ids:
                self._require(conn, "models", "id", "model_ids entry", model_id)
            return conn.execute("INSERT INTO phase_handoffs (session_id, source_phase, target_phase, "
                                "model_ids, validation_status, metrics, created_at) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", values).lastrowid
        return self._write(insert, "register_phase_handoff")

    def list_phase_handoffs(self, session_id: str) -> list[dict]:
        rows = self._read(lambda c: c.execute(
            "SELECT * FROM phase_handoffs WHERE session_id = ? ORDER BY id", (session_id,)).fetchall())
        return [dict(r, model_ids=json.loads(r["model_ids"]), metrics=json.loads(r["metrics"])) for r in rows]

    def register_artifact(self, model_id: str, name: str, version: str) -> None:
        """Store the W&B artifact name and version logged for a model (repeats are ignored)."""
        values = (_check_text("model_id", model_id), _check_text("name", name),
                  _check_text("version", version), utc_now())

        def insert(conn: sqlite3.Connection) -> None:
            self._require(conn, "models", "id", "model_id", model_id)
            conn.execute("INSERT OR IGNORE INTO artifacts (model_id, name, version, created_at) "
                         "VALUES (?, ?, ?, ?)", values)
        self._write(insert, "register_artifact")

    # -- maintenance ----------------------------------------------------------------------------
    def checkpoint_wal(self) -> dict:
        """PRAGMA wal_checkpoint(TRUNCATE): copy the WAL into the database and empty it.
        busy=True means a reader or writer kept it from finishing."""
        def run() -> tuple:
            return self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        before = self._wal_bytes()
        with self._lock:
            busy, wal_frames, checkpointed = schema.with_retry(run, self.timeout, "checkpoint_wal")
        return {"busy": bool(busy), "wal_frames": wal_frames, "checkpointed_frames": checkpointed,
                "wal_bytes_before": before, "wal_bytes_after": self._wal_bytes()}

    def _wal_bytes(self) -> int:
        wal = Path(f"{self.path}-wal")
        return wal.stat().st_size if wal.exists() else 0

    def vacuum_incremental(self, pages: int | None = None) -> int:
        """Return up to `pages` free pages (all when None) to the file system; returns pages freed.
        The file shrinks once the WAL is checkpointed, which this does afterwards.

        Python's sqlite3 steps a row-less statement once, and ``PRAGMA incremental_vacuum`` frees
        one page per step, so a single execute frees one page whatever N says: we step it per page.
        """
        if pages is not None:
            check_positive_int("pages", pages)

        def vacuum(conn: sqlite3.Connection) -> int:
            before = conn.execute("PRAGMA freelist_count").fetchone()[0]
            for _ in range(before if pages is None else min(pages, before)):
                conn.execute("PRAGMA incremental_vacuum(1)")
            return before - conn.execute("PRAGMA freelist_count").fetchone()[0]
        freed = self._write(vacuum, "vacuum_incremental")
        self.checkpoint_wal()
        return freed

    def apply_cleanup(self, policy: CleanupPolicy, now: datetime | None = None) -> dict:
        """Delete the sessions and models the policy selects (rows first, in one transaction),
        then their files (only those under policy.file_root, default: the database's folder,
        and only when no remaining model points at the same file). "models_deleted" counts the
        deleted sessions' models too."""
        if not isinstance(policy, CleanupPolicy):
            raise TypeError(f"policy must be a CleanupPolicy, got {type(policy).__name__}")
        now = datetime.now(timezone.utc) if now is None else now
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")

        def run(conn: sqlite3.Connection):
            plan = plan_cleanup(conn, policy, now)
            return plan, delete_planned(conn, plan)
        plan, (model_ids, paths) = self._write(run, "apply_cleanup")
        root = policy.file_root if policy.file_root is not None else self.path.parent
        deleted, skipped = delete_files(paths, Path(root))
        return {"sessions_deleted": sorted(plan.session_ids), "models_deleted": model_ids,
                "models_protected": sorted(plan.protected_ids), "files_deleted": deleted,
                "files_skipped": skipped}

    def get_storage_stats(self) -> dict:
        """Sizes (database, WAL, model files), page counts and row counts per table."""
        def read(conn: sqlite3.Connection) -> dict:
            pragma = {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in
                      ("page_size", "page_count", "freelist_count", "auto_vacuum", "journal_mode",
                       "user_version")}
            counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in schema.TABLES}
            model_bytes = conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM models").fetchone()[0]
            return {**pragma, "tables": counts, "model_bytes": model_bytes}
        stats = self._read(read)
        stats["schema_version"] = stats.pop("user_version")
        stats["db_bytes"] = self.path.stat().st_size
        stats["wal_bytes"] = self._wal_bytes()
        return stats
