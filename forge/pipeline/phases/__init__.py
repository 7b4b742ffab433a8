"""The phase packages, and the controllers of forge.phase_table loaded by import string.

Controllers load lazily, so listing phases imports no training code, and a controller module that is
not there yet reads as "not implemented yet" (any other import error is a real error and propagates).
A run stops at a phase that is not implemented and skips one that is switched off (`enabled: false`).
Each phase is a package `phase<n>_<name>/` holding its controller (the recipe: what it trains, on
what, which checks it must pass) and the helpers only it uses.
"""
from __future__ import annotations

import importlib
import importlib.util

from forge.phase_table import LAST_PHASE, PHASES, phase_name, phase_range_text
from forge.pipeline.controller import PhaseController, PipelineError


def load_controller_class(phase: int) -> type[PhaseController] | None:
    """The controller class of `phase`, or None when it is not implemented yet."""
    name = phase_name(phase)
    target = PHASES[phase][1]
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:   # the module exists but something it imports is missing
            raise
        return None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, PhaseController)):
        raise TypeError(f"phase {phase} ({name}): {target} is not a PhaseController subclass")
    return cls


def is_implemented(phase: int) -> bool:
    """True when the phase table names a controller whose module exists. Found without importing it (a phase's
    training code imports torch, peft and more: seconds), so listing phases stays fast; a module that fails to
    import, or lacks its class, still fails when the phase is loaded to run."""
    target = PHASES[phase][1]
    if target is None:
        return False
    try:
        return importlib.util.find_spec(target.partition(":")[0]) is not None
    except ModuleNotFoundError:      # a parent package is missing
        return False


def is_enabled(phase: int, config) -> bool:
    """False when the phase's config section says `enabled: false` (the user switched it off)."""
    return bool(getattr(config.phase(phase), "enabled", True))


def why_not_runnable(phase: int, config) -> str | None:
    """None when `phase` can run under `config`, else the reason a run stops before it."""
    if not is_implemented(phase):
        return "is not implemented yet"
    if not is_enabled(phase, config):
        return f"is switched off (phases.phase{phase}.enabled: false)"
    return None


def feeding_phase(phase: int, config, completed) -> int | None:
    """The phase of `completed` (a session's completed phases) whose models feed a plan that starts at `phase`:
    the phase before it, or, where that is switched off and did not run, the one before that, and so on
    (None: the phase that should feed it has not run)."""
    for source in range(phase - 1, 0, -1):
        if source in completed:
            return source
        if is_enabled(source, config):
            return None
    return None


def runnable_phases(plan: list[int], config) -> list[int]:
    """The phases of `plan` a run executes: a switched-off phase is skipped (the next phase takes the models of
    the last one that ran), and the run stops at the first phase that is not implemented."""
    runnable = []
    for phase in plan:
        if not is_implemented(phase):
            break
        if is_enabled(phase, config):
            runnable.append(phase)
    return runnable


def _span(phases: list[int]) -> str:
    """[1, 2, 3, 4, 5, 6, 8] -> 'phases 1..6, 8'."""
    runs, start = [], phases[0]
    for prev, phase in zip(phases, phases[1:] + [None]):
        if phase != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}..{prev}")
            start = phase
    return ("phase " if len(phases) == 1 else "phases ") + ", ".join(runs)


def plan_text(plan: list[int], config) -> str:
    """'phases 1..6, 8 (phase 7 is switched off ...: skipped)': what a run of `plan` will do."""
    runnable = runnable_phases(plan, config)
    stop = next((p for p in plan if not is_implemented(p)), None)
    if not runnable:
        return f"phase {plan[0]} {why_not_runnable(plan[0], config)}: nothing can run"
    notes = [f"phase {p} {why_not_runnable(p, config)}: skipped" for p in plan
             if p not in runnable and (stop is None or p < stop)]
    if stop is not None:
        notes.append(f"phase {stop} {why_not_runnable(stop, config)}; the run stops there")
    return _span(runnable) + (f" ({'; '.join(notes)})" if notes else "")


def make_plan(from_phase: int = 1, only: int | None = None, to_phase: int | None = None) -> list[int]:
    """The phases a run covers: from `from_phase` to `to_phase` (default: the last phase), or just `only`."""
    for label, value in (("from_phase", from_phase), ("only", only), ("to_phase", to_phase)):
        if value is not None and (isinstance(value, bool) or value not in PHASES):
            raise PipelineError(f"unknown phase {value!r} for {label}; phases are {phase_range_text()}")
    if only is not None:
        return [only]
    last = LAST_PHASE if to_phase is None else to_phase
    if last < from_phase:
        raise PipelineError(f"to_phase {last} comes before from_phase {from_phase}")
    return list(range(from_phase, last + 1))
