"""Phase 8, Final compression: SeedLM -> VPTQ -> hyper-compression with quality gates (recipe.py)."""
from forge.pipeline.phases.phase8_compression.recipe import CompressionPhase

__all__ = ["CompressionPhase"]
