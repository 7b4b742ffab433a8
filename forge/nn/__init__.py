"""forge.nn: model building blocks whose internals the optimizers need to see (e.g. QK-clip)."""
from forge.nn.attention import CausalSelfAttention, apply_rotary
from forge.nn.bitlinear import BitLinear, convert_to_bitlinear

__all__ = ["CausalSelfAttention", "apply_rotary", "BitLinear", "convert_to_bitlinear"]
