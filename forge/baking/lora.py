"""peft LoRA on forge's own `Transformer`: wrap a copy, train the adapters, merge back to a plain model.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds W + (alpha / r) * B A to each targeted Linear, with B = 0 at
the start, so the wrapped model begins exactly at the original weights. The target names are the real
module names of `forge.nn.Transformer` (blocks.<i>.attn.{q,k,v,o}_proj, blocks.<i>.mlp.{gate,up,down}_proj,
and optionally `head`); the original system's baker targeted names its model did not have, so here a name that
matches no module is an error.
"""
from __future__ import annotations

import copy

import peft
import torch
from torch import nn

from forge.nn.transformer import Transformer
from forge.ops._validate import check_finite_number, check_positive_int

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES
ALLOWED_TARGET_MODULES = DEFAULT_TARGET_MODULES + ("head",)


def lora_config(rank: int, alpha: float, dropout: float = 0.0,
                target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> peft.LoraConfig:
    """A validated peft `LoraConfig` for forge's Transformer (no bias adapters)."""
    check_positive_int("rank", rank)
    check_finite_number("alpha", alpha, 0.0, float("inf"), low_open=True)
    check_finite_number("dropout", dropout, 0.0, 1.0, high_open=True)
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of names from {list(ALLOWED_TARGET_MODULES)}; "
                         f"got {target_modules!r}")
    unknown = sorted(set(target_modules) - set(ALLOWED_TARGET_MODULES))
    if unknown:
        raise ValueError(f"target_modules {unknown} are not Linear layers of forge.nn.Transformer; "
                         f"allowed: {list(ALLOWED_TARGET_MODULES)}")
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                           target_modules=list(target_modules))


def wrap_lora(model: Transformer, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
              target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> peft.PeftModel:
    """A LoRA-wrapped deep copy of `model`; only the adapters train and `model` itself is never touched.

    peft injects adapters in place, which is how the original system ended up comparing a model with itself; the
    copy keeps the caller's model as an independent original. The adapters take the model's dtype/device.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a forge.nn.Transformer, got {type(model).__name__}")
    config = lora_config(rank, alpha, dropout, tuple(target_modules))
    base = copy.deepcopy(model)
    for p in base.parameters():
        p.requires_grad_(False)
    wrapped = peft.get_peft_model(base, config)
    reference = next(model.parameters())
    return wrapped.to(device=reference.device, dtype=reference.dtype)


def lora_parameters(wrapped: peft.PeftModel) -> list[nn.Parameter]:
    """The trainable adapter matrices (lora_A, lora_B) of a wrapped model."""
    params = [p for name, p in wrapped.named_parameters() if p.requires_grad and "lora_" in name]
    if not params:
        raise ValueError("the model has no trainable LoRA parameters; wrap it with wrap_lora first")
    return params


def merge_lora(wrapped: peft.PeftModel) -> Transformer:
    """Fold the adapters into the weights (W + alpha/r * B A) and return the plain forge Transformer,
    with the same state-dict keys as the model that was wrapped and every parameter trainable again."""
    if not isinstance(wrapped, peft.PeftModel):
        raise TypeError(f"expected a peft.PeftModel from wrap_lora, got {type(wrapped).__name__}")
    merged = wrapped.merge_and_unload()
    if not isinstance(merged, Transformer):
        raise TypeError(f"merge_and_unload returned {type(merged).__name__}, not a forge.nn.Transformer")
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


@torch.no_grad()
def interpolate(original: nn.Module, baked: nn.Module, strength: float) -> nn.Module:
    """Weight interpolation W = (1 - s) W_original + s W_baked (the original system's Phase-6 "half-baking" by
    strength): s = 0 gives the original, s = 1 the baked model, s > 1 extrapolates past the bake.
    Returns a new model; neither input changes. Integer buffers are taken from `original`."""
    s = check_finite_number("strength", strength)
    a, b = original.state_dict(), baked.state_dict()
    if a.keys() != b.keys():
        raise ValueError(f"original and baked have different parameters: "
                         f"{sorted(set(a) ^ set(b))[:5]}")
    mixed = {}
    for name, wa in a.items():
        wb = b[name]
        if wa.shape != wb.shape:
            raise ValueError(f"{name}: original has shape {tuple(wa.shape)}, baked {tuple(wb.shape)}")
        if not wa.is_floating_point():
            mixed[name] = wa.clone()
        elif s == 0.0 or s == 1.0:  # exact endpoints, no rounding from (1 - s) * a + s * b
            mixed[name] = (wa if s == 0.0 else wb).clone()
        else:
            mixed[name] = torch.lerp(wa.float(), wb.float(), s).to(wa.dtype)
    out = copy.deepcopy(original)
    out.load_state_dict(mixed)
    return out
