"""A/B cycles: tool use (A) and persona baking (B) alternate, and each kind's own metric history decides
when to switch (the original system's plateau rule, with its goals made explicit).

Start with A. After every cycle its metric (A: tool accuracy on held-out beyond-ability questions; B: mean
adherence without the prompt of the personas baked so far) is appended to that kind's history, and the tool
score is measured again (a bake may cost tool use). The run stops when the tool score reaches `target_score`
and every persona has been baked once, when the tool score plateaus with every persona baked, or after
`max_cycles`. Otherwise it switches kind when the current kind's goal is met (A: the target score; B: every
persona baked, one per B-cycle) or its metric plateaued: it moved less than `plateau_threshold` over the last
`plateau_window` cycles of that kind. Each cycle's entry in the log says
which kind ran, its metric and why the run went on, switched or stopped.
"""
from __future__ import annotations

from typing import Callable


def plateaued(history: list[float], window: int, threshold: float) -> bool:
    """The last `window` values span less than `threshold` (False while fewer values exist)."""
    if len(history) < window:
        return False
    recent = history[-window:]
    return max(recent) - min(recent) < threshold


def run_cycles(run_a: Callable[[int], float], run_b: Callable[[int], float], tool_score: Callable[[], float],
               all_baked: Callable[[], bool], cfg, on_cycle: Callable[[dict], None] = lambda _: None) -> list[dict]:
    """Run A/B cycles (see the module); returns the log, one dict per cycle: cycle, kind, metric, value,
    tool_score, decision (continue | switch | stop) and reason."""
    history: dict[str, list[float]] = {"A": [], "B": []}
    log, kind = [], "A"
    for cycle in range(1, cfg.max_cycles + 1):
        value = (run_a if kind == "A" else run_b)(cycle)
        history[kind].append(value)
        score = value if kind == "A" else tool_score()
        decision, reason = _decide(kind, history[kind], score, all_baked(), cfg)
        if decision == "continue" and cycle == cfg.max_cycles:
            decision, reason = "stop", f"max_cycles {cfg.max_cycles} reached"
        entry = {"cycle": cycle, "kind": kind, "metric": "tool_accuracy" if kind == "A" else "persona_adherence",
                 "value": value, "tool_score": score, "decision": decision, "reason": reason}
        log.append(entry)
        on_cycle(entry)
        if decision == "stop":
            break
        if decision == "switch":
            kind = "B" if kind == "A" else "A"
    return log


def _decide(kind: str, history: list[float], score: float, baked: bool, cfg) -> tuple[str, str]:
    if score >= cfg.target_score and baked:
        return "stop", f"tool score {score:.3f} >= target {cfg.target_score:g} and every persona baked"
    if cfg.max_cycles == 1:
        return "stop", "max_cycles 1 reached"
    if kind == "A" and score >= cfg.target_score:
        return "switch", f"tool score {score:.3f} reached the target {cfg.target_score:g}"
    if kind == "B" and baked:
        return "switch", "every persona baked"
    if plateaued(history, cfg.plateau_window, cfg.plateau_threshold):
        why = (f"{'tool accuracy' if kind == 'A' else 'adherence'} moved less than {cfg.plateau_threshold:g} "
               f"over {cfg.plateau_window} cycles")
        if kind == "A" and baked:    # nothing left for a B-cycle to do
            return "stop", why + " and every persona is baked"
        return "switch", why
    return "continue", "still improving"
