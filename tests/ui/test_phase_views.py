"""The phase figures on what phases 1-6 really record: the `tiny_run` fixture runs a tiny real `forge run` of
phases 1-6 (a few dozen steps each, so the phases' pass checks are switched off; the keys and values are the
pipeline's own) and reads back its registry results, model metadata and metrics.jsonl. Each test checks that a
figure draws exactly those values, so a figure fed made-up numbers fails."""
from __future__ import annotations

import pytest

from forge.ui import data, plots
from forge.ui.phase_views import (
    COVERED,
    PHASE_FIGURES,
    PhaseData,
    phase2_figures,
    training_curves,
)

RECORDED: dict = {}


@pytest.fixture(autouse=True)
def recorded_run(tiny_run):
    RECORDED.clear()
    RECORDED.update(tiny_run)


def phase_data(phase: int) -> PhaseData:
    result = RECORDED["phase_results"].get(str(phase))
    models = [m for m in RECORDED["models"] if m["phase"] == phase]
    return PhaseData(phase, data.metric_points(RECORDED["records"], phase), result, models, RECORDED["config"])


def trace(figure, name):
    return next(t for t in figure.data if t.name == name)


def test_every_figure_has_a_title_and_labelled_axes():
    for phase, builder in PHASE_FIGURES.items():
        for figure in builder(phase_data(phase)) + training_curves(phase_data(phase)):
            layout = figure.layout
            assert layout.title.text and layout.xaxis.title.text is not None and layout.yaxis.title.text, phase
            if figure.data[0].type == "heatmap":      # categories on both axes; the unit is on the colour bar
                assert "(fraction correct)" in figure.data[0].colorbar.title.text
            else:
                assert "(" in layout.yaxis.title.text, f"phase {phase}: {layout.yaxis.title.text} names no unit"


def test_phase1_curves_are_each_branch_models_own():
    figures = PHASE_FIGURES[1](phase_data(1))
    for model in (m for m in RECORDED["models"] if m["phase"] == 1):
        assert list(trace(figures[0], model["name"]).y) == pytest.approx(model["metadata"]["loss_curve"])
        assert list(trace(figures[1], model["name"]).y) == pytest.approx([a for _, a in model["metadata"]["val_curve"]])


def test_phase2_fitness_by_generation_and_merge_lineage():
    (champion,) = [m for m in RECORDED["models"] if m["phase"] == 2]
    history = champion["metadata"]["evolution"]["history"]
    fitness, lineage = phase2_figures(phase_data(2), ["cognate-a", "cognate-b", "cognate-c"])
    assert list(trace(fitness, "best").y) == pytest.approx([h["best"] for h in history])
    assert list(trace(fitness, "mean").y) == pytest.approx([h["mean"] for h in history])
    weights = [h["best_recipe"]["params"]["weights"] for h in history]
    assert list(trace(lineage, "cognate-b").y) == pytest.approx([w[1] for w in weights])
    assert list(lineage.data[-1].text) == [h["best_recipe"]["operator"] for h in history]


def test_phase3_ablation_shows_with_without_empty_and_other_thoughts():
    metrics = RECORDED["phase_results"]["3"]["metrics"]
    ablation = PHASE_FIGURES[3](phase_data(3))[0]
    shown = dict(zip(ablation.data[0].x, ablation.data[0].y))
    assert shown["own thoughts"] == metrics["accuracy"]
    assert shown["no thoughts"] == metrics["accuracy_no_thoughts"]
    assert shown["empty thought"] == metrics["accuracy_empty_thought"]
    assert shown["other (shuffled) thoughts"] == metrics["accuracy_shuffled_thoughts"]


def test_phase4_sizes_and_accuracy_per_stage():
    metrics = RECORDED["phase_results"]["4"]["metrics"]
    sizes, stages, retention = PHASE_FIGURES[4](phase_data(4))
    assert list(retention.data[0].y) == pytest.approx([metrics["accuracy_retention"],
                                                       metrics["packed_accuracy_retention"]])
    assert list(sizes.data[0].y) == pytest.approx([metrics["float_size_bytes"] / 2**20,
                                                   metrics["packed_size_bytes"] / 2**20])
    assert list(stages.data[0].y) == pytest.approx([metrics["float_accuracy"], metrics["quantized_only_accuracy"],
                                                    metrics["accuracy"], metrics["packed_accuracy"]])


def test_phase5_levels_over_time_per_task_and_the_level_tables():
    figures = PHASE_FIGURES[5](phase_data(5))
    levels = figures[0]
    for record in (r for r in RECORDED["records"] if r["phase"] == 5):
        for name, value in record["metrics"].items():
            if name.startswith("level/"):
                task_trace = trace(levels, name.split("/", 1)[1])
                assert value in list(task_trace.y) and record["step"] in list(task_trace.x)
    uniform = next(f for f in figures if "uniform" in f.layout.title.text)
    table = RECORDED["phase_results"]["5"]["metrics"]["uniform_level_accuracy"]
    row = list(uniform.data[0].y).index("addition")
    assert list(uniform.data[0].z[row]) == pytest.approx([table["addition"][k] for k in sorted(table["addition"], key=int)])
    assert not training_curves(phase_data(5), COVERED[5])   # levels are not drawn twice


def test_phase6_cycle_log_and_tool_against_no_tool():
    metrics = RECORDED["phase_results"]["6"]["metrics"]
    cycles, tools = PHASE_FIGURES[6](phase_data(6))
    log = metrics["cycle_log"]
    drawn = [(x, y) for t in cycles.data for x, y in zip(t.x, t.y)]
    assert sorted(drawn) == sorted((e["cycle"], e["tool_score"]) for e in log)
    with_tool = trace(tools, "with calculator")
    assert dict(zip(with_tool.x, with_tool.y)) == {k.split("/")[1]: v for k, v in metrics.items()
                                                    if k.startswith("tool_accuracy/")}


def test_units_and_labels():
    assert plots.axis_label("val_loss") == "val_loss (nats per answer token)"
    assert plots.axis_label("size (MiB)") == "size (MiB)"
    assert plots.unit_of("tool_score") == "fraction correct"
