import math

import pytest

from forge.tracking import METRIC_CATALOGUE, PHASE_NAMES, MetricContinuityTracker, MetricSpec, lookup_metric


def test_catalogue_covers_all_phases_with_one_direction_per_name():
    assert sorted(METRIC_CATALOGUE) == list(range(1, 9)) == sorted(PHASE_NAMES)
    direction = {}
    for phase, specs in METRIC_CATALOGUE.items():
        assert specs, f"phase {phase} has no metrics"
        for name, spec in specs.items():
            assert isinstance(spec, MetricSpec) and spec.name == name and spec.description
            assert direction.setdefault(name, spec.higher_is_better) == spec.higher_is_better, name


@pytest.mark.parametrize("phase, name, higher", [
    (1, "train_loss", False), (1, "val_loss", False), (1, "val_accuracy", True), (2, "fitness", True),
    (2, "memory_mb", False), (4, "compression_ratio", True), (4, "accuracy_retention", True),
    (4, "val_perplexity", False), (8, "model_size_mb", False), (7, "latency_ms", False),
])
def test_directions(phase, name, higher):
    assert METRIC_CATALOGUE[phase][name].higher_is_better is higher


def test_lookup_prefixed_and_unknown_names():
    assert lookup_metric("cognate-a/val_loss", 1).name == "val_loss"
    assert lookup_metric("fitness", 1).higher_is_better   # defined by phase 2, found from phase 1
    assert lookup_metric("mystery", 1) is None and lookup_metric("a/mystery") is None


def test_regressions_in_both_directions():
    tracker = MetricContinuityTracker()
    tracker.record(1, {"val_accuracy": 0.90, "val_loss": 0.50, "val_perplexity": 1.6})
    tracker.record(2, {"val_accuracy": 0.70, "val_loss": 0.40, "val_perplexity": 1.5})   # acc worse
    tracker.record(4, {"val_accuracy": 0.72, "val_loss": 0.80, "val_perplexity": 1.55})  # loss worse
    found = tracker.regressions(tolerance=0.1)
    assert found == [("val_accuracy", 1, 2, 0.90, 0.70), ("val_loss", 2, 4, 0.40, 0.80)]
    assert found[0].metric == "val_accuracy" and found[1].to_phase == 4
    # improvements in the opposite direction are never reported
    better = MetricContinuityTracker()
    better.record(1, {"val_accuracy": 0.5, "val_loss": 1.0})
    better.record(2, {"val_accuracy": 0.9, "val_loss": 0.2})
    assert better.regressions(0.0) == []


def test_tolerance_is_relative_to_the_earlier_value():
    tracker = MetricContinuityTracker()
    tracker.record(4, {"compression_ratio": 8.0, "model_size_mb": 2.0})
    tracker.record(8, {"compression_ratio": 7.5, "model_size_mb": 2.1})   # -6.25 %, +5 %
    assert tracker.regressions(tolerance=0.1) == []
    assert {r.metric for r in tracker.regressions(tolerance=0.04)} == {"compression_ratio", "model_size_mb"}
    assert [r.metric for r in tracker.regressions(tolerance=0.06)] == ["compression_ratio"]


def test_nan_is_a_regression_and_unknown_metrics_are_flagged_not_compared():
    tracker = MetricContinuityTracker()
    assert tracker.record(1, {"val_loss": 0.5, "mystery": 1.0}) == ["mystery"]
    tracker.record(2, {"val_loss": math.nan, "mystery": 100.0})
    tracker.record(3, {"val_loss": 0.6})
    assert tracker.unknown == {"mystery"}
    found = tracker.regressions(0.1)
    assert [(r.metric, r.from_phase, r.to_phase) for r in found] == [("val_loss", 1, 2)]
    assert tracker.trend("val_loss")[0] == (1, 0.5) and [p for p, _ in tracker.trend("val_loss")] == [1, 2, 3]


def test_record_merges_and_validates():
    tracker = MetricContinuityTracker()
    tracker.record(1, {"val_loss": 0.5})
    tracker.record(1, {"val_accuracy": 0.5})
    tracker.record(2, {"val_loss": 0.9, "val_accuracy": 0.2})
    assert {r.metric for r in tracker.regressions()} == {"val_loss", "val_accuracy"}
    with pytest.raises(ValueError, match="Invalid phase"):
        tracker.record(0, {"val_loss": 1.0})
    with pytest.raises(TypeError, match="val_loss"):
        tracker.record(1, {"val_loss": "high"})
    with pytest.raises(ValueError, match="tolerance"):
        tracker.regressions(-0.1)


def test_custom_catalogue():
    catalogue = {1: {"score": MetricSpec("score", True, "s")}, 2: {}}
    tracker = MetricContinuityTracker(catalogue)
    tracker.record(1, {"score": 10.0, "val_loss": 1.0})
    tracker.record(2, {"score": 5.0, "val_loss": 9.0})
    assert tracker.unknown == {"val_loss"}
    assert tracker.regressions() == [("score", 1, 2, 10.0, 5.0)]
