"""forge.nn: model building blocks whose internals the optimizers need to see (e.g. QK-clip)."""
from forge.nn.attention import CausalSelfAttention, apply_rotary

__all__ = ["CausalSelfAttention", "apply_rotary"]
