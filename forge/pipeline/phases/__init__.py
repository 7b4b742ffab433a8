"""The phase table: number -> (name, "module:Class" of its controller, or None = not implemented yet).

Controllers load lazily by import string, so listing phases imports no training code, and a
controller module that is not there yet reads as "not implemented yet" (any other import error
is a real error and propagates).
"""
from __future__ import annotations

import importlib

from forge.pipeline.controller import PhaseController, PipelineError

PHASES: dict[int, tuple[str, str | None]] = {
    1: ("cognate", "forge.pipeline.phases.phase1_cognate:CognatePhase"),
    2: ("evomerge", "forge.pipeline.phases.phase2_evomerge:EvoMergePhase"),
    3: ("quietstar", "forge.pipeline.phases.phase3_quietstar:QuietStarPhase"),
    4: ("bitnet", "forge.pipeline.phases.phase4_bitnet:BitNetPhase"),
    5: ("curriculum", None),
    6: ("baking", None),
    7: ("experts", None),
    8: ("compression", None),
}


def phase_name(phase: int) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are 1..{max(PHASES)}")
    return PHASES[phase][0]


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
    """The phases a run covers: from `from_phase` to 8, or just `only`."""
    for label, value in (("from_phase", from_phase), ("only", only)):
        if value is not None and (isinstance(value, bool) or value not in PHASES):
            raise PipelineError(f"unknown phase {value!r} for {label}; phases are 1..{max(PHASES)}")
    if only is not None:
        return [only]
    return list(range(from_phase, max(PHASES) + 1))
