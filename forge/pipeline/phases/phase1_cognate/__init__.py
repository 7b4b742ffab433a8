"""Phase 1, Cognate: a shared trunk and diverse specialists branched from it (recipe.py)."""
from forge.pipeline.phases.phase1_cognate.recipe import CognatePhase

__all__ = ["CognatePhase"]
