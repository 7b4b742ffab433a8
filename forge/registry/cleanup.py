"""Cleanup policies: which old sessions and models to delete, and deleting their files safely.

What a policy never deletes: a running session; a model that a kept model descends from (lineage
stays complete back to Phase 1; a session holding such a model is kept whole); the outputs of a
kept session's latest completed phase results (resume and rollback reload them). Rows go first,
in the caller's transaction; files after the commit, so a crash leaves at worst an orphaned file,
never a row pointing at a deleted one.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from forge._checks import check_finite_number
from forge.registry import schema
from forge.registry.checkpoint import metadata_path_for


def _check_count(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"Invalid {name}: {value!r}; expected None (no limit) or an integer >= 0")


@dataclass(frozen=True)
class CleanupPolicy:
    """None disables a rule. Counts keep the newest entries.

    max_session_age_days: delete finished sessions that ended longer ago than this.
    max_sessions_total: keep at most this many sessions (running ones are never deleted).
    max_models_per_session: keep the newest N models of each session.
    keep_last_n_checkpoints: keep the newest N models tagged `checkpoint_tag` per session and phase.
    remove_superseded: delete models a rerun of their phase replaced (after a rollback and resume).
    file_root: files are deleted only under this folder (default: the database's folder).
    """
    max_session_age_days: float | None = None
    max_sessions_total: int | None = None
    max_models_per_session: int | None = None
    keep_last_n_checkpoints: int | None = None
    checkpoint_tag: str = "checkpoint"
    remove_superseded: bool = False
    file_root: Path | None = None

    def __post_init__(self) -> None:
        if self.max_session_age_days is not None:
            check_finite_number("max_session_age_days", self.max_session_age_days, low=0.0)
        _check_count("max_sessions_total", self.max_sessions_total)
        _check_count("max_models_per_session", self.max_models_per_session)
        _check_count("keep_last_n_checkpoints", self.keep_last_n_checkpoints)
        if not isinstance(self.checkpoint_tag, str) or not self.checkpoint_tag:
            raise ValueError(f"checkpoint_tag must be a non-empty str, got {self.checkpoint_tag!r}")
        if self.file_root is not None and not isinstance(self.file_root, (str, os.PathLike)):
            raise TypeError(f"file_root must be a path or None, got {type(self.file_root).__name__}")


@dataclass
class CleanupPlan:
    session_ids: set[str] = field(default_factory=set)
    model_ids: set[str] = field(default_factory=set)      # in kept sessions
    protected_ids: set[str] = field(default_factory=set)  # selected by a rule but kept


def _session_candidates(sessions: list[sqlite3.Row], policy: CleanupPolicy, now: datetime) -> set[str]:
    """Finished sessions that are too old or beyond the newest max_sessions_total."""
    out = set()
    finished = [s for s in sessions if s["status"] in schema.FINAL_STATUSES]
    if policy.max_session_age_days is not None:
        cutoff = (now - timedelta(days=policy.max_session_age_days)).isoformat(timespec="microseconds")
        out |= {s["id"] for s in finished if (s["ended_at"] or s["started_at"]) < cutoff}
    if policy.max_sessions_total is not None:
        newest_first = sorted(sessions, key=lambda s: (s["started_at"], s["rowid"]), reverse=True)
        over = {s["id"] for s in newest_first[policy.max_sessions_total:]}
        out |= {s["id"] for s in finished if s["id"] in over}
    return out


def _model_candidates(models: list[sqlite3.Row], tagged: set[str], policy: CleanupPolicy) -> set[str]:
    """Models beyond the newest N per session, and checkpoints beyond the newest N per session+phase."""
    per_session, per_phase = defaultdict(list), defaultdict(list)
    for m in sorted(models, key=lambda m: (m["created_at"], m["rowid"]), reverse=True):
        per_session[m["session_id"]].append(m["id"])
        if m["id"] in tagged:
            per_phase[(m["session_id"], m["phase"])].append(m["id"])
    out = set()
    if policy.max_models_per_session is not None:
        for ids in per_session.values():
            out |= set(ids[policy.max_models_per_session:])
    if policy.keep_last_n_checkpoints is not None:
        for ids in per_phase.values():
            out |= set(ids[policy.keep_last_n_checkpoints:])
    return out


def _ancestors(ids: set[str], parents: dict[str, list[str]]) -> set[str]:
    seen, stack = set(), list(ids)
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def plan_cleanup(conn: sqlite3.Connection, policy: CleanupPolicy, now: datetime) -> CleanupPlan:
    """Select what to delete, then un-select until everything kept is still complete."""
    sessions = conn.execute("SELECT rowid, id, status, started_at, ended_at FROM sessions").fetchall()
    models = conn.execute("SELECT rowid, id, session_id, phase, created_at FROM models").fetchall()
    tagged = {r[0] for r in conn.execute("SELECT model_id FROM model_tags WHERE tag = ?",
                                         (policy.checkpoint_tag,))}
    parents = defaultdict(list)
    for child, parent in conn.execute("SELECT model_id, parent_id FROM model_parents"):
        parents[child].append(parent)
    outputs = defaultdict(set)
    for (session_id, _), row in schema.completed_phase_rows(conn).items():
        outputs[session_id] |= set(json.loads(row["model_ids"]))
    session_of = {m["id"]: m["session_id"] for m in models}
    candidates = _model_candidates(models, tagged, policy)
    if policy.remove_superseded:
        candidates |= schema.superseded_model_ids(conn)
    plan = CleanupPlan(_session_candidates(sessions, policy, now), candidates)
    while True:
        gone = plan.model_ids | {m for m, s in session_of.items() if s in plan.session_ids}
        kept = set(session_of) - gone
        kept_sessions = {s["id"] for s in sessions} - plan.session_ids
        needed = _ancestors(kept, parents).union(*(outputs[s] for s in kept_sessions))
        blocked = {session_of[m] for m in needed if session_of.get(m) in plan.session_ids}
        rescued = needed & plan.model_ids
        if not blocked and not rescued:
            break
        plan.protected_ids |= rescued | {m for m, s in session_of.items() if s in blocked}
        plan.session_ids -= blocked
        plan.model_ids -= rescued
    plan.model_ids -= {m for m in plan.model_ids if session_of[m] in plan.session_ids}
    return plan


def delete_planned(conn: sqlite3.Connection, plan: CleanupPlan) -> tuple[list[str], list[str]]:
    """Delete the planned rows (models cascade to tags, parents, artifacts; sessions to all their
    rows); returns (every model id deleted, the paths no remaining model points at)."""
    doomed = set(plan.model_ids)
    for session_id in plan.session_ids:
        doomed |= {r[0] for r in conn.execute("SELECT id FROM models WHERE session_id = ?", (session_id,))}
    paths = set()
    for model_id in doomed:
        paths.add(conn.execute("SELECT path FROM models WHERE id = ?", (model_id,)).fetchone()[0])
    conn.executemany("DELETE FROM models WHERE id = ?", [(m,) for m in sorted(doomed)])
    conn.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in sorted(plan.session_ids)])
    still_used = {p for p in paths
                  if conn.execute("SELECT 1 FROM models WHERE path = ?", (p,)).fetchone() is not None}
    return sorted(doomed), sorted(paths - still_used)


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:   # different drives
        return False


def delete_files(paths: list[str], root: Path) -> tuple[list[str], list[str]]:
    """Unlink each model file and its JSON sidecar if it lies under root (symlinks resolved).
    Returns (deleted, skipped-with-reason)."""
    real_root = os.path.realpath(root)
    deleted, skipped = [], []
    for path in paths:
        real = Path(os.path.realpath(path))
        if not _inside(str(real), real_root):
            skipped.append(f"{path} (outside {real_root})")
            continue
        if not real.is_file():
            skipped.append(f"{path} (already missing)")
        sidecars = [metadata_path_for(real)] if real.suffix == ".safetensors" else []
        for target in [real, *sidecars]:
            if target.is_file():
                target.unlink()
                deleted.append(str(target))
    return deleted, skipped
