"""The phase packages, and the controllers of forge.phase_table loaded by import string.

Controllers load lazily, so listing phases imports no training code, and a controller module that is
not there yet reads as "not implemented yet" (any other import error is a real error and propagates).
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


def runnable_prefix(plan: list[int], config) -> list[int]:
    """The phases of `plan` a run gets through: up to the first that is not implemented or switched off."""
    runnable = []
    for phase in plan:
        if why_not_runnable(phase, config) is not None:
            break
        runnable.append(phase)
    return runnable


def plan_text(plan: list[int], config) -> str:
    """'phases 1..6 (7: not implemented yet; the run stops there)': what a run of `plan` will do."""
    runnable = runnable_prefix(plan, config)
    if not runnable:
        return f"phase {plan[0]} {why_not_runnable(plan[0], config)}: nothing can run"
    text = f"phase {runnable[0]}" if len(runnable) == 1 else f"phases {runnable[0]}..{runnable[-1]}"
    if len(runnable) < len(plan):
        stop = plan[len(runnable)]
        text += f" (phase {stop} {why_not_runnable(stop, config)}; the run stops there)"
    return text


def make_plan(from_phase: int = 1, only: int | None = None) -> list[int]:
    """The phases a run covers: from `from_phase` to the last phase, or just `only`."""
    for label, value in (("from_phase", from_phase), ("only", only)):
        if value is not None and (isinstance(value, bool) or value not in PHASES):
            raise PipelineError(f"unknown phase {value!r} for {label}; phases are {phase_range_text()}")
    if only is not None:
        return [only]
    return list(range(from_phase, LAST_PHASE + 1))
