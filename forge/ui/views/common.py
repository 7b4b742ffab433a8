"""Small pieces several pages share: time formatting, figure lists, a session picker."""
from __future__ import annotations

from datetime import datetime

import streamlit as st


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def wall_seconds(session: dict) -> float | None:
    """Seconds from start to end (to now while running); None when a time is missing."""
    start, end = parse_time(session.get("started_at")), parse_time(session.get("ended_at"))
    if start is None:
        return None
    if end is None:
        end = datetime.now(start.tzinfo)
    return max((end - start).total_seconds(), 0.0)


def short_time(text: str | None) -> str:
    when = parse_time(text)
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else ""


def show_figures(figures: list, key: str) -> None:
    for index, figure in enumerate(figures):
        st.plotly_chart(figure, key=f"{key}-{index}")


def pick_session(sessions: list[dict], label: str = "Session", key: str = "session") -> dict | None:
    """A select box over the sessions (newest first); the choice is shared by every page."""
    if not sessions:
        st.info("The registry has no sessions yet: start one with `forge run`.")
        return None
    ids = [s["id"] for s in sessions]
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]
    chosen = st.selectbox(label, ids, key=key)
    return next(s for s in sessions if s["id"] == chosen)
