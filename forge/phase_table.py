"""The phase table: the one list of the pipeline's phases (number -> name, controller).

Everything that needs to know the phases reads this module: the pipeline (config sections, plan,
controllers), the registry schema (the range of its phase columns), the metric catalogue and the
CLI. It imports nothing, so the lowest layers may read it too. A controller is a "module:Class"
import string loaded by `forge.pipeline.phases`, or None while the phase is not implemented.
"""
from __future__ import annotations

PHASES: dict[int, tuple[str, str | None]] = {
    1: ("cognate", "forge.pipeline.phases.phase1_cognate:CognatePhase"),
    2: ("evomerge", "forge.pipeline.phases.phase2_evomerge:EvoMergePhase"),
    3: ("quietstar", "forge.pipeline.phases.phase3_quietstar:QuietStarPhase"),
    4: ("bitnet", "forge.pipeline.phases.phase4_bitnet:BitNetPhase"),
    5: ("curriculum", "forge.pipeline.phases.phase5_curriculum:CurriculumPhase"),
    6: ("baking", "forge.pipeline.phases.phase6_baking:BakingPhase"),
    7: ("experts", "forge.pipeline.phases.phase7_experts.recipe:ExpertsPhase"),
    8: ("compression", "forge.pipeline.phases.phase8_compression:CompressionPhase"),
}
FIRST_PHASE, LAST_PHASE = min(PHASES), max(PHASES)
PHASE_NAMES: dict[int, str] = {number: name for number, (name, _) in PHASES.items()}


def phase_range_text() -> str:
    """'1..8': how error messages name the valid phase numbers."""
    return f"{FIRST_PHASE}..{LAST_PHASE}"


def check_phase_number(phase, what: str = "phase") -> int:
    """`phase` as a known phase number; ValueError naming `what` and the valid range otherwise."""
    if isinstance(phase, bool) or not isinstance(phase, int) or phase not in PHASES:
        raise ValueError(f"Invalid {what}: {phase!r}; expected an integer in {phase_range_text()}")
    return phase


def phase_name(phase: int) -> str:
    return PHASES[check_phase_number(phase)][0]
