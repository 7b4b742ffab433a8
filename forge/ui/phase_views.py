"""The figures of one phase's page, built from what that phase recorded (and nothing else).

`training_curves` draws every metric logged at two or more steps in metrics.jsonl; `PHASE_FIGURES` adds
each phase's own views from its registry result and model sidecars. A builder returns [] when its data
is not there, so the page can say "not recorded" instead of drawing an empty or made-up chart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import plotly.graph_objects as go

from forge.ui import plots

# a metric whose first part names one of several series of the same quantity (level/<task>, cycle_A/<metric>)
SERIES_PREFIXES = ("level", "level_accuracy", "cycle_A", "cycle_B")


@dataclass
class PhaseData:
    phase: int
    points: list[dict]                   # forge.ui.data.metric_points of this phase
    result: dict | None                  # forge.ui.data.phase_results, None when the phase did not complete
    models: list[dict] = field(default_factory=list)   # this phase's models in the session (with metadata)
    config: dict = field(default_factory=dict)          # the session's pipeline config

    @property
    def metrics(self) -> dict:
        return (self.result or {}).get("metrics", {})


def _family(name: str) -> tuple[str, str]:
    """(figure, series) a logged metric belongs to: 'cognate-a/train_loss' -> ('train_loss', 'cognate-a')."""
    parts = name.split("/")
    if len(parts) == 1:
        return name, name
    if parts[0] in SERIES_PREFIXES:
        return parts[0], "/".join(parts[1:])
    return parts[-1], "/".join(parts[:-1])


def logged_series(data: PhaseData) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """family -> series -> (step, value) of everything the phase logged with a step."""
    series: dict[str, dict[str, list]] = {}
    for point in data.points:
        if point["step"] is not None:
            family, name = _family(point["metric"])
            series.setdefault(family, {}).setdefault(name, []).append((point["step"], point["value"]))
    return series


def training_curves(data: PhaseData, skip: frozenset = frozenset()) -> list[go.Figure]:
    """One line chart per quantity logged at two or more steps (loss, accuracy, fitness, ...), except the
    families in `skip` (drawn by the phase's own figures)."""
    series = {f: lines for f, lines in logged_series(data).items() if f not in skip}
    figures = []
    for family, lines in sorted(series.items()):
        lines = {name: pts for name, pts in lines.items() if len({s for s, _ in pts}) >= 2}
        if lines:
            step_shape = family == "level"
            figures.append(plots.line_chart(lines, f"Phase {data.phase}: {family} by step", "step",
                                            plots.axis_label(family), step_shape=step_shape))
    return figures


def phase1_figures(data: PhaseData) -> list[go.Figure]:
    """Each branch model's training loss and validation accuracy curves (kept in its sidecar metadata)."""
    steps = int(((data.config.get("phases") or {}).get("phase1") or {}).get("steps", 0) or 0)
    stride = max(1, steps // 100)
    losses = {m["name"]: [(i * stride, v) for i, v in enumerate(m["metadata"].get("loss_curve") or [])]
              for m in data.models}
    accuracy = {m["name"]: [(s, a) for s, a in (m["metadata"].get("val_curve") or [])] for m in data.models}
    figures = []
    if any(losses.values()):
        figures.append(plots.line_chart(losses, "Phase 1: training loss per branch model", "branch step",
                                        plots.axis_label("train_loss")))
    if any(accuracy.values()):
        figures.append(plots.line_chart(accuracy, "Phase 1: validation accuracy per branch model", "branch step",
                                        plots.axis_label("val_accuracy")))
    return figures


def evolution_of(data: PhaseData) -> dict:
    for model in data.models:
        if isinstance(model["metadata"].get("evolution"), dict):
            return model["metadata"]["evolution"]
    return {}


def phase2_figures(data: PhaseData, parent_names: list[str] | None = None) -> list[go.Figure]:
    """Fitness by generation (best and mean) and the merge lineage: which parents the best recipe mixes."""
    history = evolution_of(data).get("history") or []
    if not history:
        return []
    fitness = {"best": [(h["generation"], h["best"]) for h in history],
               "mean": [(h["generation"], h["mean"]) for h in history]}
    figures = [plots.line_chart(fitness, "Phase 2: fitness by generation", "generation", plots.axis_label("fitness"))]
    rows = [{"generation": h["generation"], "operator": h["best_recipe"]["operator"],
             "weights": list((h["best_recipe"].get("params") or {}).get("weights") or [])}
            for h in history if isinstance(h.get("best_recipe"), dict)]
    if rows and any(row["weights"] for row in rows):
        width = max(len(row["weights"]) for row in rows)
        names = (parent_names or [])[:width] + [f"input {i + 1}" for i in range(len(parent_names or []), width)]
        figures.append(plots.stacked_weights(rows, names, "Phase 2: merge lineage (best recipe per generation)"))
    return figures


def phase3_figures(data: PhaseData) -> list[go.Figure]:
    """The thought ablation (with / without / empty / shuffled thoughts) and per-task accuracy."""
    labels = {"accuracy": "own thoughts", "accuracy_no_thoughts": "no thoughts",
              "accuracy_empty_thought": "empty thought", "accuracy_shuffled_thoughts": "other (shuffled) thoughts",
              "input_accuracy": "input model", "baked_accuracy": "after prompt bake"}
    values = {text: float(data.metrics[key]) for key, text in labels.items() if _number(data.metrics.get(key))}
    figures = []
    if values:
        figures.append(plots.bar_chart(values, "Phase 3: thought ablation (test accuracy)", "condition",
                                       plots.axis_label("accuracy")))
    per_task = {name: data.metrics[key] for key, name in (("per_task_accuracy", "own thoughts"),
                                                         ("per_task_accuracy_no_thoughts", "no thoughts"))
                if isinstance(data.metrics.get(key), dict)}
    if per_task:
        figures.append(plots.grouped_bars(per_task, "Phase 3: accuracy per task, with and without thoughts",
                                          "task", plots.axis_label("accuracy")))
    rewards = [(i, v) for m in data.models for i, v in enumerate(m["metadata"].get("reward_curve") or [])]
    if rewards:
        figures.append(plots.line_chart({"mean reward": rewards}, "Phase 3: thought RL reward", "RL step",
                                        plots.axis_label("reward")))
    return figures


def phase4_figures(data: PhaseData) -> list[go.Figure]:
    """Size and accuracy per stage: float input, ternary before STE, after STE (dequantized), packed 2-bit."""
    m, figures = data.metrics, []
    sizes = {label: m[key] / 2**20 for key, label in (("float_size_bytes", "float (fp32)"),
                                                     ("packed_size_bytes", "packed ternary")) if _number(m.get(key))}
    if sizes:
        figures.append(plots.bar_chart(sizes, "Phase 4: checkpoint size per stage", "stage", "size (MiB)", ".2f"))
    stages = {label: m[key] for key, label in (("float_accuracy", "float input"),
                                              ("quantized_only_accuracy", "ternary, before STE"),
                                              ("accuracy", "ternary after STE (dequantized)"),
                                              ("packed_accuracy", "packed 2-bit")) if _number(m.get(key))}
    if stages:
        figures.append(plots.bar_chart(stages, "Phase 4: test accuracy per stage", "stage",
                                       plots.axis_label("accuracy")))
    kept = {label: m[key] for key, label in (("accuracy_retention", "dequantized / float"),
                                            ("packed_accuracy_retention", "packed / float")) if _number(m.get(key))}
    if kept:
        figures.append(plots.bar_chart(kept, "Phase 4: accuracy retention per stage", "stage",
                                       plots.axis_label("accuracy_retention")))
    return figures


def phase5_figures(data: PhaseData) -> list[go.Figure]:
    """The level each task climbs over the steps (and its accuracy there), then held-out accuracy per task and
    level: before the phase, after the climb, uniform control, handed on."""
    figures, logged = [], logged_series(data)
    if logged.get("level"):
        figures.append(plots.line_chart(logged["level"], "Phase 5: level each task is on, over the climb", "step",
                                        plots.axis_label("level"), step_shape=True))
    if logged.get("level_accuracy"):
        figures.append(plots.line_chart(logged["level_accuracy"], "Phase 5: validation accuracy on the current "
                                        "level, per task", "step", plots.axis_label("level_accuracy")))
    for key, text in (("level_accuracy_before", "incoming model"), ("climbed_level_accuracy", "after the climb"),
                      ("uniform_level_accuracy", "uniform-training control"), ("per_level_accuracy", "handed-on model")):
        table = data.metrics.get(key)
        if isinstance(table, dict) and table:
            rows = {task: {str(level): v for level, v in levels.items()} for task, levels in table.items()
                    if isinstance(levels, dict)}
            figures.append(plots.heatmap(rows, f"Phase 5: accuracy per task and level, {text}", "level", "task",
                                         plots.axis_label("accuracy")))
    return figures


def phase6_figures(data: PhaseData) -> list[go.Figure]:
    """The A/B cycle log (tool score after each cycle) and tool against no-tool accuracy per task."""
    figures = []
    log = [e for e in data.metrics.get("cycle_log") or [] if isinstance(e, dict)]
    if log:
        series = {f"{kind}-cycles": [(e["cycle"], e["tool_score"]) for e in log if e.get("kind") == kind]
                  for kind in sorted({e.get("kind") for e in log})}
        figures.append(plots.line_chart(series, "Phase 6: tool score after each A/B cycle", "cycle",
                                        plots.axis_label("tool_score")))
    groups = {label: data.metrics[key] for key, label in (("tool_accuracy", "with calculator"),
                                                          ("no_tool_accuracy", "without calculator"))
              if isinstance(data.metrics.get(key), dict)}
    if not groups:
        groups = _per_task(data.metrics, {"tool_accuracy/": "with calculator", "no_tool_accuracy/": "without calculator"})
    if groups:
        figures.append(plots.grouped_bars(groups, "Phase 6: beyond-ability accuracy per task", "task",
                                          plots.axis_label("accuracy")))
    return figures


def phase8_figures(data: PhaseData) -> list[go.Figure]:
    """Each compression stage's file size and accuracy (with the incoming model's and Phase 4's ternary file for
    reference), and accuracy against bits per weight: the trade the gates judged."""
    m, figures = data.metrics, []
    sizes, accuracy = m.get("stage_file_bytes"), m.get("stage_accuracy")
    if not (isinstance(sizes, dict) and isinstance(accuracy, dict) and sizes):
        return figures
    kept = m.get("stage_kept") or {}
    label = lambda stage: f"{stage} ({'kept' if kept.get(stage) else 'rolled back'})"   # noqa: E731
    bars = {"incoming (fp32)": m.get("input_size_bytes"), "Phase 4 ternary": m.get("ternary_size_bytes"),
            **{label(s): v for s, v in sizes.items()}}
    figures.append(plots.bar_chart({k: v / 1024 for k, v in bars.items() if _number(v)},
                                   "Phase 8: checkpoint size per stage", "stage", "size (KiB)", ".1f"))
    scores = {"incoming": m.get("input_accuracy"), **{label(s): v for s, v in accuracy.items()}}
    figures.append(plots.bar_chart({k: v for k, v in scores.items() if _number(v)},
                                   "Phase 8: held-out accuracy per stage", "stage", plots.axis_label("accuracy")))
    bits = m.get("stage_bits_per_weight") or {}
    points = [(bits[s], accuracy[s]) for s in sizes if _number(bits.get(s)) and _number(accuracy.get(s))]
    if points:
        figures.append(plots.line_chart({"stages": points}, "Phase 8: accuracy against bits per weight",
                                        "bits per compressed weight", plots.axis_label("accuracy")))
    return figures


def _per_task(metrics: dict, prefixes: dict[str, str]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for prefix, label in prefixes.items():
            rest = key[len(prefix):]
            if key.startswith(prefix) and "/" not in rest and _number(value):
                groups.setdefault(label, {})[rest] = float(value)
    return groups


def cycle_rows(data: PhaseData) -> list[dict]:
    """Phase 6's cycle log as table rows (cycle, kind, metric, value, tool score, decision, reason)."""
    return [e for e in data.metrics.get("cycle_log") or [] if isinstance(e, dict)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# logged families a phase's own figures already draw (left out of training_curves when those are shown)
COVERED = {2: frozenset({"best_fitness", "mean_fitness"}), 5: frozenset({"level", "level_accuracy"}),
           6: frozenset({"tool_score", "cycle_A", "cycle_B"})}
PHASE_FIGURES = {1: phase1_figures, 2: phase2_figures, 3: phase3_figures, 4: phase4_figures,
                 5: phase5_figures, 6: phase6_figures, 8: phase8_figures}
