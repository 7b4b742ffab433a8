"""forge.nn: model building blocks whose internals the optimizers need to see (e.g. QK-clip), and KL losses."""
from forge.nn.attention import CausalSelfAttention, apply_rotary
from forge.nn.bitlinear import BitLinear, convert_to_bitlinear
from forge.nn.losses import KLRegularizer, kl_to_teacher
from forge.nn.svf import SVFLinear, add_svf, fold_svf, load_expert, save_expert
from forge.nn.transformer import RMSNorm, SwiGLU, Transformer, TransformerConfig, build_model, resize_vocab

__all__ = [
    "BitLinear",
    "CausalSelfAttention",
    "KLRegularizer",
    "RMSNorm",
    "SVFLinear",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
    "add_svf",
    "apply_rotary",
    "build_model",
    "convert_to_bitlinear",
    "fold_svf",
    "kl_to_teacher",
    "load_expert",
    "resize_vocab",
    "save_expert",
]
