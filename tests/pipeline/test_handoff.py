"""The one evaluator of the phases' pass checks (forge.pipeline.handoff.check_bounds): strict and inclusive
limits, limits read from the phase's config section, checks that apply only at the phase's end or only where
a metric is recorded, and failure messages that name the metric, the limit and what the failure means."""
from types import SimpleNamespace

import pytest

from forge.pipeline.controller import HandoffError
from forge.pipeline.handoff import MetricBound, check_bounds

SECTION = SimpleNamespace(min_gain=0.1, max_drop=0.2)
BOUNDS = (MetricBound("gain", low="min_gain", strict=True, reason="gain {value:.2f} from base {base:.2f}"),
          MetricBound("drop", high="max_drop", optional=True),
          MetricBound("spread", low=0.0, phase_end_only=True))


def test_passing_metrics_pass_at_both_gates():
    check_bounds(BOUNDS, {"gain": 0.2, "drop": 0.1, "spread": 1.0, "base": 0.5}, "here", SECTION, at_phase_end=True)
    check_bounds(BOUNDS, {"gain": 0.2}, "here", SECTION, at_phase_end=False)   # drop optional, spread end-only


@pytest.mark.parametrize("metrics, at_end, message", [
    ({"gain": 0.1, "spread": 1.0, "base": 0.5}, True, r"here: gain = 0.1 must be > 0.1: gain 0.10 from base 0.50"),
    ({"gain": 0.1}, False, r"gain = 0.1 must be > 0.1: gain from base$"),           # reason without its numbers
    ({"gain": 0.5, "drop": 0.3, "spread": 1.0}, True, r"drop = 0.3 must be <= 0.2$"),
    ({"gain": 0.5}, True, r"here has no metric spread"),
    ({"gain": float("nan")}, False, r"metric gain must be a finite number"),
])
def test_failures_name_the_metric_the_limit_and_the_reason(metrics, at_end, message):
    with pytest.raises(HandoffError, match=message):
        check_bounds(BOUNDS, metrics, "here", SECTION, at_phase_end=at_end)
