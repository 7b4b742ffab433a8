"""Which metrics a session's metrics.jsonl holds that forge.tracking.METRIC_CATALOGUE does not know."""
from forge.tracking import lookup_metric, read_metrics


def uncatalogued(session_dir) -> list[str]:
    return sorted({name for line in read_metrics(session_dir) for name in line["metrics"]
                   if lookup_metric(name, line["phase"]) is None})
