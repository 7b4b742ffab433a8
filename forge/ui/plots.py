"""Plotly figures for the dashboard, each with a title, labelled axes and units.

Builders take plain lists and dicts (what `forge.ui.data` returns) and never invent a value: a series with
no points is left out, and the caller says so on the page.
"""
from __future__ import annotations

import plotly.graph_objects as go

HEIGHT = 380
# unit shown on an axis, by a word in the metric name (first match wins)
UNITS = (("size_bytes", "MiB"), ("size_mb", "MiB"), ("loss", "nats per answer token"),
         ("perplexity", "exp(loss)"), ("retention", "fraction kept"), ("accuracy", "fraction correct"),
         ("fitness", "weighted score"), ("score", "fraction correct"), ("level", "difficulty level"),
         ("seconds", "s"), ("duration", "s"), ("kl", "nats"), ("rate", "fraction"), ("reward", "reward per thought"))


def unit_of(metric: str) -> str:
    name = metric.lower()
    return next((unit for word, unit in UNITS if word in name), "value")


def axis_label(metric: str) -> str:
    """'val_loss (nats per answer token)'; a name that already carries its unit, 'size (MiB)', stays."""
    return metric if metric.endswith(")") else f"{metric} ({unit_of(metric)})"


def style(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01}, xaxis_title=x_title, yaxis_title=y_title,
                      template="plotly_white", height=height, margin={"l": 70, "r": 20, "t": 60, "b": 60},
                      legend={"orientation": "h", "y": -0.22}, font={"size": 13})
    return fig


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_title: str, y_title: str,
               step_shape: bool = False) -> go.Figure:
    """One line per named series of (x, y) points."""
    fig = go.Figure()
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        fig.add_trace(go.Scatter(x=list(xs), y=list(ys), name=name, mode="lines+markers",
                                 line={"shape": "hv" if step_shape else "linear"}))
    xs_all = [x for points in series.values() for x, _ in points]
    if xs_all and all(float(x).is_integer() for x in xs_all) and max(xs_all) - min(xs_all) <= 12:
        fig.update_xaxes(dtick=1)          # generations, cycles: whole numbers only
    if step_shape:
        fig.update_yaxes(dtick=1, rangemode="tozero")
    return style(fig, title, x_title, y_title)


def bar_chart(values: dict[str, float], title: str, x_title: str, y_title: str, fmt: str = ".3f") -> go.Figure:
    names = list(values)
    fig = go.Figure(go.Bar(x=names, y=[values[n] for n in names], text=[format(values[n], fmt) for n in names],
                           textposition="outside", marker_color="#4C78A8"))
    fig.update_yaxes(rangemode="tozero")
    return style(fig, title, x_title, y_title)


def grouped_bars(groups: dict[str, dict[str, float]], title: str, x_title: str, y_title: str) -> go.Figure:
    """groups: series name -> {category: value}; one bar per series in each category."""
    fig = go.Figure()
    for name, values in groups.items():
        fig.add_trace(go.Bar(name=name, x=list(values), y=list(values.values()),
                             text=[f"{v:.2f}" for v in values.values()], textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(rangemode="tozero")
    return style(fig, title, x_title, y_title)


def heatmap(rows: dict[str, dict[str, float]], title: str, x_title: str, y_title: str, z_title: str) -> go.Figure:
    """rows: row name -> {column: value}; columns sorted numerically when they are numbers."""
    columns = sorted({c for values in rows.values() for c in values}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    names = list(rows)
    z = [[rows[r].get(c) for c in columns] for r in names]
    fig = go.Figure(go.Heatmap(z=z, x=columns, y=names, colorscale="Blues", zmin=0, zmax=1,
                               colorbar={"title": {"text": z_title}},
                               text=[["" if v is None else f"{v:.2f}" for v in row] for row in z],
                               texttemplate="%{text}"))
    return style(fig, title, x_title, y_title, height=max(260, 70 + 40 * len(names)))


def stacked_weights(rows: list[dict], inputs: list[str], title: str) -> go.Figure:
    """Merge lineage: per generation, the weight of each parent model in the best recipe (operator as text)."""
    fig = go.Figure()
    generations = [row["generation"] for row in rows]
    for index, name in enumerate(inputs):
        weights = [(row["weights"][index] if index < len(row["weights"]) else 0.0) for row in rows]
        fig.add_trace(go.Bar(name=name, x=generations, y=weights))
    fig.add_trace(go.Scatter(x=generations, y=[1.04] * len(rows), mode="text", showlegend=False,
                             text=[row["operator"] for row in rows], textposition="top center"))
    fig.update_layout(barmode="stack")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(range=[0, 1.2])
    return style(fig, title, "generation", "parent weight in the best recipe (fraction)")


def lineage_graph(models: list[dict], edges: list[tuple[str, str]], title: str) -> go.Figure:
    """Models as points (x = phase, stacked within a phase), parent -> child edges as lines."""
    by_phase: dict[int, list[dict]] = {}
    for model in sorted(models, key=lambda m: (m["phase"], m["name"])):
        by_phase.setdefault(model["phase"], []).append(model)
    where = {m["id"]: (phase, i - (len(group) - 1) / 2) for phase, group in by_phase.items()
             for i, m in enumerate(group)}
    fig = go.Figure()
    for parent, child in edges:
        if parent in where and child in where:
            (x0, y0), (x1, y1) = where[parent], where[child]
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line={"color": "#999"},
                                     hoverinfo="skip", showlegend=False))
    ids = list(where)
    names = {m["id"]: m["name"] for m in models}
    fig.add_trace(go.Scatter(x=[where[i][0] for i in ids], y=[where[i][1] for i in ids], mode="markers+text",
                             text=[names[i] for i in ids], customdata=ids, hovertemplate="%{customdata}<extra></extra>",
                             textposition=["top center" if n % 2 == 0 else "bottom center" for n in range(len(ids))],
                             marker={"size": 16, "color": "#F58518"}, showlegend=False))
    phases = [x for x, _ in where.values()] or [1]
    fig.update_xaxes(dtick=1, range=[min(phases) - 0.5, max(phases) + 0.5])
    spread = max((abs(y) for _, y in where.values()), default=0) + 0.8
    fig.update_yaxes(showticklabels=False, zeroline=False, range=[-spread, spread])
    return style(fig, title, "phase", "models of that phase")
