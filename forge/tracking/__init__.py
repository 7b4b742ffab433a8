"""forge.tracking: W&B runs (offline by default) with a JSON-lines mirror, and the metric catalogue."""
from forge.phase_table import PHASE_NAMES
from forge.tracking.metrics import METRIC_CATALOGUE, MetricContinuityTracker, MetricSpec, Regression, lookup_metric
from forge.tracking.tracker import METRICS_FILE, Tracker, read_metrics

__all__ = ["Tracker", "METRICS_FILE", "read_metrics", "METRIC_CATALOGUE", "PHASE_NAMES", "MetricSpec",
           "MetricContinuityTracker", "Regression", "lookup_metric"]
