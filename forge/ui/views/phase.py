"""One phase of one session: its final metrics, its curves from metrics.jsonl, and its own views."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from forge.phase_table import PHASE_NAMES
from forge.tracking.metrics import lookup_metric
from forge.ui import data
from forge.ui.phase_views import (
    COVERED,
    PHASE_FIGURES,
    PhaseData,
    cycle_rows,
    phase2_figures,
    training_curves,
)
from forge.ui.views.common import show_figures


def load(run: data.RunRoot, session: dict, phase: int, records: list[dict]) -> PhaseData:
    models = [m for m in data.list_models(run, session["id"]) if m["phase"] == phase]
    config = data.session_config(run, session["id"]).get("pipeline") or {}
    return PhaseData(phase, data.metric_points(records, phase), data.phase_results(run, session["id"], phase),
                     sorted(models, key=lambda m: m["created_at"]), config)


def metrics_table(phase: int, metrics: dict) -> pd.DataFrame:
    """The phase's final numbers with what each means (from the metric catalogue) and its better direction."""
    rows = []
    for name, value in sorted(data.flat_numbers(metrics).items()):
        spec = lookup_metric(name, phase)
        rows.append({"metric": name, "value": value,
                     "better": "" if spec is None else ("higher" if spec.higher_is_better else "lower"),
                     "meaning": "" if spec is None else spec.description})
    return pd.DataFrame(rows)


def figures_for(run: data.RunRoot, session: dict, phase_data: PhaseData) -> list:
    if phase_data.phase == 2:
        parents = [m["name"] for m in sorted(data.list_models(run, session["id"]), key=lambda m: m["created_at"])
                   if m["phase"] == 1 and m["name"] != "trunk"]
        return phase2_figures(phase_data, parents)
    builder = PHASE_FIGURES.get(phase_data.phase)
    return builder(phase_data) if builder else []


def render(run: data.RunRoot, session: dict | None, phase: int) -> None:
    if session is None:
        return
    metrics_file = data.read_metrics_file(run, session["id"])
    for problem in metrics_file.problems:
        st.warning(problem)
    phase_data = load(run, session, phase, metrics_file.records)
    if phase_data.result is None and not phase_data.points:
        st.info(f"Phase {phase} ({PHASE_NAMES[phase]}) has no recorded data in session {session['id']}: "
                "it has not run (or not finished) there.")
        return
    own = figures_for(run, session, phase_data)
    figures = own + training_curves(phase_data, COVERED.get(phase, frozenset()) if own else frozenset())
    if figures:
        show_figures(figures, key=f"phase{phase}")
    else:
        st.caption("This phase logged no curves (no metric at two or more steps) in this session.")
    if phase == 6 and cycle_rows(phase_data):
        st.markdown("#### A/B cycle log")
        st.dataframe(pd.DataFrame(cycle_rows(phase_data)), hide_index=True)
    render_summary(phase_data)
    render_models(phase_data.models)


def render_summary(phase_data: PhaseData) -> None:
    if phase_data.result is None:
        st.warning("This phase has not completed in this session; below is what it logged so far.")
        return
    st.metric("Wall time", f"{phase_data.result['duration_s']:.1f} s")
    st.markdown("#### Final metrics")
    st.dataframe(metrics_table(phase_data.phase, phase_data.metrics), hide_index=True)


def render_models(models: list[dict]) -> None:
    if not models:
        return
    st.markdown("#### Models of this phase")
    rows = [{"model": m["id"], "name": m["name"], **{k: v for k, v in data.flat_numbers(m["metrics"]).items()}}
            for m in models]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
