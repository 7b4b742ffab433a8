"""Small per-session files beside the registry: the phase manifest, the session state (rollbacks,
registered handoffs) and the session lock.

Why files: the registry has no idempotency keys, so the orchestrator writes down what it is about
to register (the manifest, after every checkpoint is on disk) and matches it against the registry
after a crash. Every file is written to a temporary name and moved into place (os.replace).
"""
from __future__ import annotations

import fcntl
import json
from pathlib import Path

from forge._checks import read_capped
from forge.registry.checkpoint import write_atomically
from forge.registry.registry import safe_name

MANIFEST = "phase_result.json"
STATE = "session_state.json"
LOCK = "session.lock"
MAX_JSON_BYTES = 8 << 20   # a manifest or session state is a few KB; read no more than this


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (forge.registry.checkpoint.write_atomically: temp file, fsync, rename, directory
    fsync, no temp file left after a failure): a reader sees the old file or the new one, never half of one."""
    text = json.dumps(data, indent=2, sort_keys=True)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict | None:
    """The JSON object in path (None when there is no file), refused past MAX_JSON_BYTES."""
    if not path.is_file():
        return None
    raw = read_capped(path, MAX_JSON_BYTES, "session file")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it was edited or damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_state(session_dir: Path) -> dict:
    state = read_json(session_dir / STATE) or {}
    state.setdefault("rollbacks", [])
    state.setdefault("handoffs", {})
    return state


def write_state(session_dir: Path, state: dict) -> None:
    write_json(session_dir / STATE, state)


def remove_stale_temp_files(session_dir: Path) -> list[Path]:
    """Delete the temporary files (`.<name>.tmp`) a killed process left in the session folder and its phase
    folders. Call it holding the SessionLock: then no live process of this session is writing one."""
    stale = [*session_dir.glob(".*.tmp"), *session_dir.glob("phase*/.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class SessionLock:
    """An exclusive advisory lock on the session folder, so two processes never run one session.
    The kernel drops it when its holder dies, even by SIGKILL."""

    def __init__(self, session_dir: Path):
        self.path = session_dir / LOCK
        self.handle = None

    def __enter__(self) -> "SessionLock":
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise RuntimeError(f"session folder {self.path.parent} is in use by another forge process") from None
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under folder (symlinks not followed)."""
    return sum(path.lstat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def remove_session_folder(run_root: Path, session_id: str) -> int:
    """Delete a cleaned session's folder (trunk, checkpoints, packed files, W&B runs, manifests) if it is a real
    folder directly under run_root; returns the bytes freed (0 when there is none). A folder whose lock another
    process holds is left alone (RuntimeError): something still uses it."""
    import shutil

    folder = Path(run_root) / safe_name(session_id)
    if folder.is_symlink() or not folder.is_dir():
        return 0
    freed = folder_bytes(folder)
    with SessionLock(folder):
        shutil.rmtree(folder)      # the open lock file may be unlinked; the lock lasts until it is closed
    return freed


DIED = "its process died (no process holds the session lock); `forge resume {id}` continues it"


def reap_dead_sessions(registry, run_root: Path) -> list[str]:
    """Mark `interrupted` every session the registry says is running whose process died: its session folder
    under `run_root` has a lock file (a run took it) that no process holds. The lock is held while the status
    changes, so a run starting at that moment is refused rather than mislabelled. Returns the ids."""
    reaped = []
    for session in registry.list_sessions():
        session_dir = Path(run_root) / safe_name(session["id"])
        if session["status"] != "running" or not (session_dir / LOCK).is_file():
            continue
        try:
            with SessionLock(session_dir):
                current = registry.get_session(session["id"])
                if current is not None and current["status"] == "running":
                    registry.set_session_status(session["id"], "interrupted", error=DIED.format(id=session["id"]))
                    reaped.append(session["id"])
        except RuntimeError:       # the lock is held: its process is alive
            continue
    return reaped
