"""Pipeline overview: every session, then the chosen session's phase strip, handoff checks and final model."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from forge.phase_table import PHASE_NAMES
from forge.ui import data
from forge.ui.views.common import short_time, wall_seconds

STATUS_MARK = {"done": ":green[**done**]", "failed": ":red[**failed**]", "running": ":orange[**running**]",
               "not run": ":gray[not run]"}
REFRESH_SECONDS = 5


def sessions_table(sessions: list[dict]) -> pd.DataFrame:
    """One row per session: status, current phase, progress, start, end, wall time and seconds per phase."""
    rows = []
    for s in sessions:
        row = {"session": s["id"], "status": s["status"], "current phase": s["current_phase"],
               "progress %": round(s["progress"], 1), "started (UTC)": short_time(s["started_at"]),
               "ended (UTC)": short_time(s["ended_at"]), "wall time (s)": _rounded(wall_seconds(s))}
        for phase in PHASE_NAMES:
            row[f"phase {phase} (s)"] = _rounded(s["phase_seconds"].get(phase))
        rows.append(row)
    return pd.DataFrame(rows)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render_strip(strip: list[dict]) -> None:
    """The eight phases side by side: status, wall time, and a failed phase's reason."""
    columns = st.columns(len(strip))
    for column, entry in zip(columns, strip):
        with column.container(border=True):
            st.markdown(f"**Phase {entry['phase']}**")
            st.caption(entry["name"])
            st.markdown(STATUS_MARK[entry["status"]])
            if entry["duration_s"] is not None:
                st.caption(f"{entry['duration_s']:.1f} s")
    for entry in strip:
        if entry["status"] == "failed":
            st.error(f"Phase {entry['phase']} ({entry['name']}) failed: {entry['reason'] or 'no reason recorded'}")


def handoff_table(rows: list[dict]) -> pd.DataFrame:
    """One row per checked value of each handoff (a failed handoff's row carries its error)."""
    out = []
    for row in rows:
        values = data.flat_values(row["metrics"]) or {"": ""}
        for name, value in sorted(values.items()):
            out.append({"handoff": f"{row['source_phase']} → {row['target_phase']}",
                        "result": row["validation_status"], "checked value": name, "value": _shown(value),
                        "when (UTC)": short_time(row["created_at"])})
    return pd.DataFrame(out)


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_session(run: data.RunRoot, session: dict) -> None:
    st.subheader(f"Session {session['id']}")
    st.markdown(f"Status **{session['status']}**, phase {session['current_phase']}, "
                f"{session['progress']:.0f}% of its plan")
    if session.get("error"):
        st.warning(f"Reason: {session['error']}")
    render_strip(data.phase_strip(run, session))
    st.markdown("#### Handoff checks")
    rows = data.handoffs(run, session["id"])
    if rows:
        st.dataframe(handoff_table(rows), hide_index=True)
    else:
        st.caption("No handoff between phases has been checked in this session yet.")
    render_final_models(data.final_models(run, session["id"]))


def render_final_models(models: list[dict]) -> None:
    st.markdown("#### Final model")
    if not models:
        st.caption("No phase has completed in this session yet.")
        return
    for model in models:
        size = model["size_bytes"] / 2**20
        st.markdown(f"`{model['id']}`: phase {model['phase']} ({model['phase_name']}), {size:.2f} MiB, "
                    f"{model['parameter_count'] or '?'} parameters, sha256 `{model['sha256'][:16]}…`")
        st.caption(model["path"])


def render(run: data.RunRoot, session: dict | None) -> None:
    """The page; while any session runs, it redraws itself every REFRESH_SECONDS."""
    sessions = data.list_sessions(run)
    running = any(s["status"] == "running" for s in sessions)

    def body() -> None:
        current = data.list_sessions(run)
        st.markdown(f"#### Sessions ({len(current)})")
        st.dataframe(sessions_table(current), hide_index=True)
        chosen = next((s for s in current if session and s["id"] == session["id"]), None)
        if chosen is not None:
            render_session(run, chosen)
        if any(s["status"] == "running" for s in current):
            st.caption(f"A run is going: this page refreshes every {REFRESH_SECONDS} s.")

    st.fragment(body, run_every=REFRESH_SECONDS if running else None)()
