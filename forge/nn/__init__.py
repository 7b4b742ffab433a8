"""forge.nn: model building blocks whose internals the optimizers need to see (e.g. QK-clip)."""
from forge.nn.attention import CausalSelfAttention, apply_rotary
from forge.nn.bitlinear import BitLinear, convert_to_bitlinear
from forge.nn.transformer import RMSNorm, SwiGLU, Transformer, TransformerConfig, build_model

__all__ = [
    "BitLinear",
    "CausalSelfAttention",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
    "apply_rotary",
    "build_model",
    "convert_to_bitlinear",
]
