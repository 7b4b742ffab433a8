"""The phase packages, and the controllers of forge.phase_table loaded by import string.

Controllers load lazily, so listing phases imports no training code, and a controller module that is
not there yet reads as "not implemented yet" (any other import error is a real error and propagates).
Each phase is a package `phase<n>_<name>/` holding its controller (the recipe: what it trains, on
what, which checks it must pass) and the helpers only it uses.
"""
from __future__ import annotations

import importlib

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
    return load_controller_class(phase) is not None


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


def make_plan(from_phase: int = 1, only: int | None = None) -> list[int]:
    """The phases a run covers: from `from_phase` to the last phase, or just `only`."""
    for label, value in (("from_phase", from_phase), ("only", only)):
        if value is not None and (isinstance(value, bool) or value not in PHASES):
            raise PipelineError(f"unknown phase {value!r} for {label}; phases are {phase_range_text()}")
    if only is not None:
        return [only]
    return list(range(from_phase, LAST_PHASE + 1))
