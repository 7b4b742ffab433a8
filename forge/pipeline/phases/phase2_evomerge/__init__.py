"""Phase 2, EvoMerge: evolved merge recipes of the Phase 1 models (recipe.py)."""
from forge.pipeline.phases.phase2_evomerge.recipe import EvoMergePhase

__all__ = ["EvoMergePhase"]
