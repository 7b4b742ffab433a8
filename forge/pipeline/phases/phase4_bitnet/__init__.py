"""Phase 4, BitNet b1.58: ternary conversion, STE fine-tuning, a packed 2-bit file (recipe.py). The model
surgery it uses (conversion, calibration, freezing, dequantization) is forge.nn.quantize."""
from forge.pipeline.phases.phase4_bitnet.recipe import BitNetPhase

__all__ = ["BitNetPhase"]
