"""What a finished `forge run` / `forge resume` prints: each completed phase's wall time and the metrics its
handoff rule checks (value against bound), the final model's id, file and size, and how to load it."""
from __future__ import annotations

import math
from pathlib import Path

from forge.phase_table import phase_name
from forge.pipeline.handoff import MetricBound, phase_end_bounds, resolve


def _value(bound: MetricBound, phase_metrics: dict, models: list[dict]) -> float | None:
    """The phase's value of the metric, else the worst one among its models (what the handoff sees)."""
    value = phase_metrics.get(bound.name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    values = [m["metrics"][bound.name] for m in models if isinstance(m["metrics"].get(bound.name), (int, float))]
    if not values:
        return None
    return float(min(values) if bound.low is not None else max(values))


def _check_text(bound: MetricBound, value: float | None, section) -> str:
    if value is None:
        return f"{bound.name} not recorded"
    parts, ok = [], True
    if bound.low is not None:
        low = resolve(bound.low, section)
        ok &= value > low if bound.strict else value >= low
        parts.append(f"{'>' if bound.strict else '>='} {low:g}")
    if bound.high is not None:
        high = resolve(bound.high, section)
        ok &= value <= high
        parts.append(f"<= {high:g}")
    shown = f"{value:.3g}" if math.isfinite(value) else str(value)
    return f"{bound.name} {shown} ({', '.join(parts)}) {'ok' if ok else 'FAILED'}"


def _checks(phase: int, metrics: dict, models: list[dict], section) -> list[str]:
    out = []
    for bound in phase_end_bounds(phase):
        value = _value(bound, metrics, models)
        if value is not None or not bound.optional:
            out.append(_check_text(bound, value, section))
    return out


def phase_rows(registry, session_id: str, config, completed: dict[int, dict]) -> list[str]:
    """One line per completed phase: number, name, wall time, its checks."""
    lines = [f"{'phase':<16} {'wall':>8}  checks (value, bound)"]
    for phase, info in sorted(completed.items()):
        models = [m for m in (registry.get_model(model_id) for model_id in info["model_ids"]) if m is not None]
        checks = _checks(phase, info["metrics"], models, config.phase(phase))
        duration = info.get("duration_s")
        wall = f"{duration:.1f} s" if duration is not None else "?"
        lines.append(f"{phase} {phase_name(phase):<14} {wall:>8}  {'; '.join(checks) or 'no checks'}")
    return lines


def final_model_lines(registry, model_ids: list[str], run_root: Path) -> list[str]:
    """The final model(s): id, file, size; then the three lines of Python that load one and ask it."""
    lines = []
    for model_id in model_ids:
        record = registry.get_model(model_id)
        if record is not None:
            lines.append(f"final model {model_id}: {record['path']} ({record['size_bytes'] / 1e6:.2f} MB, "
                         f"{record['parameter_count'] or '?'} parameters)")
    if model_ids:
        lines += ["load it in Python:", "    import forge",
                  f"    model = forge.load_model({model_ids[-1]!r}, run_root={str(run_root)!r})",
                  '    print(model.answer("12+7="))',
                  f"or from the shell: forge generate{_root_flag(run_root)} {model_ids[-1]} \"12+7=\""]
    return lines


def _root_flag(run_root: Path) -> str:
    return "" if run_root == Path("runs") else f" --set run_root={run_root}"


def run_summary(registry, session_id: str, config, completed: dict[int, dict], model_ids: list[str]) -> str:
    return "\n".join([*phase_rows(registry, session_id, config, completed),
                      *final_model_lines(registry, model_ids, Path(config.run_root))])
