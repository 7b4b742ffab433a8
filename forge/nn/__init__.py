"""forge.nn: model building blocks whose internals the optimizers need to see (e.g. QK-clip)."""
from forge.nn.attention import CausalSelfAttention, apply_rotary
from forge.nn.transformer import RMSNorm, SwiGLU, Transformer, TransformerConfig, build_model

__all__ = [
    "CausalSelfAttention",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
    "apply_rotary",
    "build_model",
]
