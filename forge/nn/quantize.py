"""Whole-model BitNet b1.58 surgery: convert a model's Linears to BitLinear, measure the quantization
error, freeze to packed ternary weights, and rebuild the float model those weights define.

BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): weights q * scale, q = clamp(round(W / absmean(W)), -1, 1),
and per-token absmax int8 activations (`forge.nn.BitLinear`, `forge.ops`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from forge.nn.bitlinear import BitLinear, convert_to_bitlinear
from forge.nn.transformer import TransformerConfig, build_model
from forge.ops import ste_act_int8, ste_ternary, unpack_ternary


def to_bitlinear(model: nn.Module, preserve=("embed", "norm", "head")) -> nn.Module:
    """A deep copy of `model` with every Linear outside `preserve` as a BitLinear without its own norm.

    BitLinear's input RMSNorm becomes the identity: a forge.nn.Transformer already normalizes the inputs
    of q/k/v and gate/up, so the converted model is the float architecture with quantized weights and
    activations, and its dequantized float model computes the same function up to activation rounding."""
    converted = convert_to_bitlinear(copy.deepcopy(model), skip=tuple(preserve))
    for layer in bit_layers(converted).values():
        layer.norm = nn.Identity()
    return converted


def bit_layers(model: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def freeze_all(model: nn.Module) -> nn.Module:
    for layer in bit_layers(model).values():
        layer.freeze()
    return model.eval()


def dequantize(frozen: nn.Module, config: TransformerConfig) -> nn.Module:
    """The float `forge.nn.Transformer` whose converted Linear weights are the frozen q * scale."""
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    for name, layer in bit_layers(frozen).items():
        if not layer.frozen:
            raise ValueError(f"dequantize needs frozen BitLinear layers; {name} is not frozen")
        q = unpack_ternary(layer.packed_weight, layer.in_features).float()
        state[f"{name}.weight"] = q * layer.weight_scale.float()[:, None].expand(q.shape[0], 1)
        del state[f"{name}.packed_weight"], state[f"{name}.weight_scale"]
    model = build_model(config).to(next(iter(state.values())).device)   # on the frozen model's device
    model.load_state_dict(state, strict=True)
    return model.eval()


def sparsity(frozen: nn.Module) -> float:
    """Fraction of the packed ternary weights that are zero."""
    zeros = total = 0
    for layer in bit_layers(frozen).values():
        q = unpack_ternary(layer.packed_weight, layer.in_features)
        zeros, total = zeros + int((q == 0).sum()), total + q.numel()
    return zeros / max(total, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def calibrate(model: nn.Module, tokens: torch.Tensor) -> dict:
    """Run `tokens` through the (unfrozen) BitLinear model and measure, per layer, the relative error of
    int8 activations, ternary weights and the layer output against the float Linear on the same input.
    Sets nothing: BitLinear's scales need no calibration (absmean of the weights, absmax per token)."""
    errors = {"activation": [], "weight": [], "output": []}

    def hook(layer, inputs, _output):
        x, w = inputs[0], layer.weight
        errors["activation"].append(_rel(ste_act_int8(x), x))
        errors["weight"].append(_rel(ste_ternary(w), w))
        exact = nn.functional.linear(x, w)
        errors["output"].append(_rel(nn.functional.linear(ste_act_int8(x), ste_ternary(w)), exact))

    handles = [m.register_forward_hook(hook) for m in bit_layers(model).values()]
    try:
        model.eval()
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    out = {f"calibration_{k}_error": sum(v) / len(v) for k, v in errors.items()}
    out["calibration_max_output_error"] = max(errors["output"])
    return out
