"""Sessions or models side by side on the same metrics (a table, and a chart of the shared ones)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from forge.phase_table import PHASE_NAMES
from forge.ui import data, plots

MAX_CHART_METRICS = 12


def side_by_side(columns: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows = metrics any of them has, columns = the sessions or models (blank where one lacks it)."""
    names = sorted({name for values in columns.values() for name in values})
    return pd.DataFrame({label: [values.get(n) for n in names] for label, values in columns.items()}, index=names)


def shared(columns: dict[str, dict[str, float]]) -> list[str]:
    sets = [set(values) for values in columns.values()]
    return sorted(set.intersection(*sets)) if sets else []


def render_comparison(columns: dict[str, dict[str, float]], title: str, key: str) -> None:
    table = side_by_side(columns)
    if table.empty:
        st.info("None of the chosen items recorded metrics here.")
        return
    st.dataframe(table)
    common = shared(columns)[:MAX_CHART_METRICS]
    if common:
        st.caption(f"{title}: one chart per metric all of them recorded (each with its own unit)")
    grid = st.columns(3)
    for index, metric in enumerate(common):
        values = {short(label): columns[label][metric] for label in columns}
        figure = plots.bar_chart(values, metric, "", plots.axis_label(metric), ".4g")
        figure.update_layout(height=300, margin={"t": 50, "b": 40})
        with grid[index % 3]:
            st.plotly_chart(figure, key=f"{key}-{index}")


def short(label: str) -> str:
    """The distinctive end of a session or model id (they start alike), for a chart axis."""
    return label if len(label) <= 18 else "…" + label[-16:]


def render(run: data.RunRoot, session: dict | None) -> None:
    sessions = data.list_sessions(run)
    if len(sessions) < 1:
        st.info("The registry has no sessions yet.")
        return
    st.markdown("#### Sessions")
    ids = [s["id"] for s in sessions]
    chosen = st.multiselect("Sessions", ids, default=ids[:2], key="compare_sessions")
    phase = st.selectbox("Phase", list(PHASE_NAMES), format_func=lambda p: f"{p} {PHASE_NAMES[p]}", key="compare_phase")
    columns = {}
    for session_id in chosen:
        result = data.phase_results(run, session_id, phase)
        columns[session_id] = data.flat_numbers(result["metrics"]) if result else {}
        if result:
            columns[session_id]["wall time (s)"] = result["duration_s"]
    if chosen:
        render_comparison(columns, f"Phase {phase} ({PHASE_NAMES[phase]}): sessions compared", "compare_sessions_chart")
    st.markdown("#### Models")
    models = data.list_models(run)
    picked = st.multiselect("Models", [m["id"] for m in models], default=[m["id"] for m in models[:2]],
                            key="compare_models")
    by_id = {m["id"]: m for m in models}
    model_columns = {i: {**data.flat_numbers(by_id[i]["metrics"]), "size (MiB)": by_id[i]["size_bytes"] / 2**20}
                     for i in picked}
    if picked:
        render_comparison(model_columns, "Models compared", "compare_models_chart")
