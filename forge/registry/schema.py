"""Registry database: connection settings, the schema, and its migrations.

The schema version lives in ``PRAGMA user_version`` (written in the database header, so it
commits or rolls back with the migration that sets it). A fresh database runs every migration
in order, exactly like an old one being upgraded, so there is one code path for both.

Why the pragma order matters: ``auto_vacuum`` can only change before the first table exists,
and switching to WAL initializes the file. The seed set WAL first and so never had
incremental vacuum (its databases read ``auto_vacuum = 0``). We set it first, check it, and
convert older files with a one-time ``VACUUM``.
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Callable, TypeVar

from forge.phase_table import FIRST_PHASE, LAST_PHASE

T = TypeVar("T")

SESSION_STATUSES = ("running", "completed", "failed", "interrupted")
FINAL_STATUSES = ("completed", "failed", "interrupted")
PHASE_RESULT_STATUSES = ("completed", "failed")
HANDOFF_STATUSES = ("passed", "failed", "pending")
PHASES = range(FIRST_PHASE, LAST_PHASE + 1)   # the numbers of forge.phase_table
AUTO_VACUUM_INCREMENTAL = 2

# Version 1: the first layout (sessions, models with tags and lineage, handoffs).
_V1 = [
    f"""CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('running','completed','failed','interrupted')),
        current_phase INTEGER NOT NULL DEFAULT 0 CHECK (current_phase BETWEEN 0 AND {LAST_PHASE}),
        progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
        started_at TEXT NOT NULL,
        ended_at TEXT,
        config TEXT NOT NULL DEFAULT '{{}}')""",
    f"""CREATE TABLE models (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        phase INTEGER NOT NULL CHECK (phase BETWEEN {FIRST_PHASE} AND {LAST_PHASE}),
        phase_name TEXT NOT NULL,
        name TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        parameter_count INTEGER,
        metrics TEXT NOT NULL DEFAULT '{{}}',
        metadata TEXT NOT NULL DEFAULT '{{}}',
        created_at TEXT NOT NULL)""",
    "CREATE INDEX idx_models_session ON models(session_id)",
    "CREATE INDEX idx_models_phase ON models(phase)",
    "CREATE INDEX idx_models_created ON models(created_at)",
    """CREATE TABLE model_tags (
        model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (model_id, tag))""",
    "CREATE INDEX idx_model_tags_tag ON model_tags(tag)",
    # A parent may only disappear together with its children (checked at commit).
    """CREATE TABLE model_parents (
        model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        parent_id TEXT NOT NULL REFERENCES models(id) DEFERRABLE INITIALLY DEFERRED,
        PRIMARY KEY (model_id, parent_id))""",
    "CREATE INDEX idx_model_parents_parent ON model_parents(parent_id)",
    """CREATE TABLE phase_handoffs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        source_phase INTEGER NOT NULL,
        target_phase INTEGER NOT NULL,
        model_ids TEXT NOT NULL DEFAULT '[]',
        validation_status TEXT NOT NULL CHECK (validation_status IN ('passed','failed','pending')),
        metrics TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL)""",
]

# Version 2: session errors, per-phase results (for resume), W&B artifacts.
_V2 = [
    "ALTER TABLE sessions ADD COLUMN error TEXT",
    f"""CREATE TABLE phase_results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        phase INTEGER NOT NULL CHECK (phase BETWEEN {FIRST_PHASE} AND {LAST_PHASE}),
        status TEXT NOT NULL CHECK (status IN ('completed','failed')),
        model_ids TEXT NOT NULL DEFAULT '[]',
        metrics TEXT NOT NULL DEFAULT '{{}}',
        duration_s REAL NOT NULL,
        recorded_at TEXT NOT NULL)""",
    "CREATE INDEX idx_phase_results_session ON phase_results(session_id, phase)",
    """CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (model_id, name, version))""",
]

MIGRATIONS: dict[int, list[str]] = {1: _V1, 2: _V2}
SCHEMA_VERSION = max(MIGRATIONS)
TABLES = ("sessions", "models", "model_tags", "model_parents", "phase_results",
          "phase_handoffs", "artifacts")


class RegistryBusyError(TimeoutError):
    """The database stayed locked by other writers for longer than the registry's timeout."""


def is_busy(error: sqlite3.OperationalError) -> bool:
    """True for SQLITE_BUSY / SQLITE_LOCKED (another connection holds the lock)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(error)
    return "locked" in text or "busy" in text


def with_retry(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Call fn, retrying with jittered exponential backoff while the database is busy.

    busy_timeout already waits inside SQLite, but WAL mode returns SQLITE_BUSY without waiting
    in a few cases (recovery, snapshot conflicts, journal-mode changes), so writers retry here.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as error:
            if not is_busy(error):
                raise
            if time.monotonic() >= deadline:
                raise RegistryBusyError(
                    f"registry database stayed locked for more than {timeout:g} s during {what}; "
                    f"another process holds a long write transaction") from error
            time.sleep(delay * (1.0 + random.random()))
            delay = min(delay * 2.0, 0.25)


class RegistryFileError(ValueError):
    """The registry file is not an SQLite database, not a forge registry, or corrupted."""


class RegistryIOError(RuntimeError):
    """The registry database failed while in use: disk full, an I/O error, a file made read-only, or the
    file deleted or replaced while open. The message names the file and what to do."""


_ADVICE = (("full", "free space on the disk that holds it"),
           ("readonly", "make the file and its folder writable"),
           ("read-only", "make the file and its folder writable"),
           ("i/o", "check the disk (dmesg) and the file system"),
           ("unable to open", "check that the file and its folder exist and are writable"))


def io_error(path: Path, what: str, error: sqlite3.Error) -> RegistryIOError:
    """One line naming the file, the operation, SQLite's reason and what to do about it."""
    reason = str(error)
    advice = next((text for key, text in _ADVICE if key in reason.lower()), "check the file and the disk")
    return RegistryIOError(f"registry {path}: {what} failed ({reason}); {advice}. Nothing already "
                           "saved is lost: `forge resume SESSION` continues from the last completed phase")


SQLITE_HEADER = b"SQLite format 3\x00"


def check_file(path: Path) -> None:
    """Refuse, before SQLite touches it, a path that is a folder and a non-empty file that is not an SQLite
    database."""
    if path.is_dir():
        raise RegistryFileError(f"registry path {path} is a folder; point registry.path at a file (or leave it "
                                "empty for <run_root>/registry.db)")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
        if head != SQLITE_HEADER:
            raise RegistryFileError(f"{path} is not a forge registry (not an SQLite database); point "
                                    "registry.path elsewhere or move the file away (a new registry is created)")


def check_contents(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check, and an SQLite database without forge's schema version must be empty."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise RegistryFileError(f"{path}: the registry database is corrupted ({problems[0]}); restore it from a "
                                "backup or move it away (a new registry is created)")
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0 and tables:
        raise RegistryFileError(f"{path} is an SQLite database but not a forge registry; point registry.path "
                                "elsewhere")


def connect(path: Path, timeout: float) -> tuple[sqlite3.Connection, dict]:
    """Open the database with the registry's settings and bring its schema up to date.
    Returns (connection, {"upgraded_from": old schema version, "converted_auto_vacuum": bool}).
    A file that is not a forge registry, or a corrupted one, raises RegistryFileError."""
    check_file(path)
    try:
        return _connect(path, timeout)
    except sqlite3.DatabaseError as error:
        if isinstance(error, sqlite3.OperationalError) and is_busy(error):
            raise
        if "unable to open" in str(error):
            raise RegistryIOError(f"registry {path} cannot be opened ({error}); point registry.path at a file "
                                  "in a folder this user can write") from None
        raise RegistryFileError(f"{path}: the registry database cannot be read ({error}); restore it from a "
                                "backup or move it away (a new registry is created)") from None


def _connect(path: Path, timeout: float) -> tuple[sqlite3.Connection, dict]:
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        check_contents(conn, path)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        # Only a fresh file needs these two; checking first keeps opening an existing database
        # from waiting on another process's write lock.
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            with_retry(lambda: conn.execute("PRAGMA auto_vacuum = INCREMENTAL"), timeout, "auto_vacuum")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            mode = with_retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0],
                              timeout, "enabling WAL")
        if mode.lower() != "wal":
            raise RuntimeError(f"{path}: SQLite refused WAL journal mode (got {mode!r}); "
                               "the registry needs a local file system")
        conn.execute("PRAGMA synchronous = NORMAL")   # durable across process crashes in WAL
        conn.execute("PRAGMA foreign_keys = ON")
        report = {"upgraded_from": migrate(conn, path, timeout),
                  "converted_auto_vacuum": ensure_incremental_vacuum(conn, timeout)}
    except BaseException:
        conn.close()
        raise
    return conn, report


def migrate(conn: sqlite3.Connection, path: Path, timeout: float) -> int:
    """Apply the missing migrations in one IMMEDIATE transaction; returns the old version."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current == SCHEMA_VERSION:
        return current                     # the common case takes no write lock

    def attempt() -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path}: registry schema version {version} is newer than this forge "
                    f"supports ({SCHEMA_VERSION}); upgrade forge")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            return version
        except BaseException:
            rollback(conn)
            raise
    return with_retry(attempt, timeout, "schema migration")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def ensure_incremental_vacuum(conn: sqlite3.Connection, timeout: float) -> bool:
    """Convert a database created without auto_vacuum (e.g. by an old version) once; True if it did."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return False
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    with_retry(lambda: conn.execute("VACUUM"), timeout, "VACUUM to enable incremental vacuum")
    value = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    if value != AUTO_VACUUM_INCREMENTAL:
        raise RuntimeError(f"auto_vacuum is {value} after VACUUM; expected 2 (incremental)")
    return True


def completed_phase_rows(conn: sqlite3.Connection, session_id: str | None = None) -> dict:
    """The latest completed result per (session_id, phase), as raw rows (registry and cleanup share it)."""
    sql = ("SELECT session_id, phase, status, model_ids, metrics, duration_s, recorded_at "
           "FROM phase_results WHERE status = 'completed'")
    params: tuple = ()
    if session_id is not None:
        sql += " AND session_id = ?"
        params = (session_id,)
    latest = {}
    for row in conn.execute(sql + " ORDER BY id", params):
        latest[(row[0], row[1])] = row   # later rows (reruns) replace earlier ones
    return latest


def superseded_model_ids(conn: sqlite3.Connection) -> set[str]:
    """Models a later run of their phase replaced: the phase of their session has a completed result recorded
    after the model was registered that does not list it (a rollback and resume redid the phase, in a -rK
    folder). A model registered after its phase's latest completed result (a rerun still going, or killed
    before it finished and waiting to be adopted on resume) is not superseded."""
    latest = completed_phase_rows(conn)
    out = set()
    for model_id, session_id, phase, created_at in conn.execute(
            "SELECT id, session_id, phase, created_at FROM models"):
        row = latest.get((session_id, phase))
        if row is not None and created_at < row["recorded_at"] and model_id not in json.loads(row["model_ids"]):
            out.add(model_id)
    return out

