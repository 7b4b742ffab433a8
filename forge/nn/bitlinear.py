"""BitLinear: the BitNet b1.58 linear layer (Ma et al. 2024, arXiv 2402.17764, and the "Training Tips,
Code and FAQ" note), a drop-in replacement for nn.Linear.

Training (paper placement, RMSNorm inside the layer):
    y = F.linear(ste_act_int8(rmsnorm(x)), ste_ternary(W)) (+ bias)
with full-precision latent weights W updated through the straight-through estimator.
`freeze()` swaps W for packed 2-bit codes and its scale (a frozen state_dict is ~16x smaller than
fp32) and runs `forge.ops.ternary_linear` on int8 activations; `unfreeze()` goes back to latent
weights q * scale (the dequantized model a later fine-tuning phase trains).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from forge.ops import pack_ternary, ste_act_int8, ste_ternary, ternary_linear, ternary_quant, unpack_ternary
from forge.ops._validate import check_finite_number, check_float_tensor, check_positive_int

DEFAULT_SKIP = ("head", "lm_head", "output", "classifier", "embed")


class BitLinear(nn.Module):
    """Ternary-weight, int8-activation linear layer with its own RMSNorm on the input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, per_channel: bool = False,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.per_channel = bool(per_channel)
        check_finite_number("norm_eps", norm_eps, low=0.0, low_open=True)
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.RMSNorm(in_features, eps=norm_eps, **factory)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features={self.in_features}); got {tuple(x.shape)}")
        h = self.norm(x)
        if self.frozen:
            if torch.is_grad_enabled() and h.requires_grad:
                raise RuntimeError("a frozen BitLinear is inference-only (no gradients); call unfreeze() to train")
            y = ternary_linear(h, self.packed_weight, self.weight_scale, self.out_features)
        else:
            y = F.linear(ste_act_int8(h), ste_ternary(self.weight, self.per_channel))
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def freeze(self) -> "BitLinear":
        """Replace the latent weight by buffers `packed_weight` (uint8, 2 bits a weight) and `weight_scale`."""
        if self.frozen:
            return self
        q, scale = ternary_quant(self.weight.detach(), self.per_channel)
        packed = pack_ternary(q)
        del self.weight
        self.register_buffer("packed_weight", packed)
        self.register_buffer("weight_scale", scale.reshape(-1).clone())
        self.frozen = True
        return self

    @torch.no_grad()
    def unfreeze(self, dtype: torch.dtype = torch.float32) -> "BitLinear":
        """Back to trainable latent weights, initialized at the dequantized ternary values q * scale."""
        if not self.frozen:
            return self
        q = unpack_ternary(self.packed_weight, self.in_features).to(dtype)
        weight = q * self.weight_scale.to(dtype)[:, None]
        del self.packed_weight, self.weight_scale
        self.weight = nn.Parameter(weight)
        self.frozen = False
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"per_channel={self.per_channel}, frozen={self.frozen}")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """True if a component of the dotted module name, or the name itself, is in `skip`."""
    return name in skip or any(part in skip for part in name.split("."))


def convert_to_bitlinear(model: nn.Module, skip=DEFAULT_SKIP, per_channel: bool = False) -> nn.Module:
    """Swap every nn.Linear in `model` (in place) for a BitLinear holding the same weights as latent weights.

    Modules whose dotted name has a component in `skip` (by default the output head) stay full precision;
    embeddings and norms are not Linear layers and are kept as they are. Returns `model`.
    The model's own norms stay too: each BitLinear adds its RMSNorm on top (the paper removes the block
    norm; keeping it costs one normalization and changes nothing else).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a tuple of module names (str), got {skip!r}")
    skip = tuple(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _from_linear(linear, per_channel))
    return model


def _from_linear(linear: nn.Linear, per_channel: bool) -> BitLinear:
    w = linear.weight
    layer = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, per_channel=per_channel,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer
