"""Phase 6, Tool and persona baking: A-cycles teach the calculator Toolformer-style (toolformer.py), B-cycles
teach and bake a persona (personas.py), cycles.py alternates them, recipe.py is the phase."""
from forge.pipeline.phases.phase6_baking.recipe import BakingPhase

__all__ = ["BakingPhase"]
