"""Phase 8's three codecs applied to a whole model: each stage takes the model the previous kept stage made (its
decoded weights) and returns a new model whose compressible Linear layers are CodedLinears.

1. SeedLM (forge.nn.compress.seedlm): every weight in blocks of C, each a K-bit LFSR seed, P 4-bit mantissas and a
   shared 4-bit exponent, the seed found by the fused exhaustive search (forge.ops.seedlm_search).
2. VPTQ (forge.nn.compress.vptq): the previous stage's decoded weights vector-quantized against the diagonal of each
   layer's Hessian H = 2 X^T X / n, X the layer's inputs in the previous stage's model on calibration prompts, with
   GPTQ error feedback and an optional residual codebook.
3. Hyper-compression (forge.nn.compress.hyper): a VQ-coded layer keeps its indices (then lzma-coded) and its
   codebooks become ergodic-trajectory indices (`hyper_vq`); a layer that is not VQ-coded (the VPTQ stage rolled
   back) has its decoded weights hyper-coded directly (`hyper_encode`), as the paper does.
Every stage's model is rebuilt from its stored bytes (`from_bytes`), so what a gate evaluates is what the file holds.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from forge.distributed import broadcast, world
from forge.nn.compress.coded import (
    CodedLinear,
    coded_model_from_state,
    compressible_linears,
    layer_weight,
    set_module,
    write_codec_table,
)
from forge.nn.compress.formats import encode_codes
from forge.nn.compress.hyper import hyper_encode, hyper_vq
from forge.nn.compress.seedlm import seedlm_encode
from forge.nn.compress.vptq import VQCodes, hessian_from_inputs, vptq_quantize
from forge.pipeline.devices import model_device

Progress = Callable[[float, str], None]


def _recode(model: nn.Module, preserve: list[str], encode, progress: Progress) -> nn.Module:
    """A copy of `model` whose compressible layers are CodedLinears of encode(name, layer). On several ranks
    (forge.distributed) the layers' searches are dealt out round-robin and run at the same time; then each layer's
    stored bytes are sent from the rank that encoded it, so every rank ends with the same model."""
    out, here = copy.deepcopy(model), world()
    layers = list(compressible_linears(out, preserve).items())
    shapes = [layer_weight(layer).shape for _, layer in layers]
    stored = {}
    for i, (name, layer) in enumerate(layers):
        if i % here.size == here.rank:
            stored[i] = encode_codes(name, encode(name, layer, layer_weight(layer)))
            progress((i + 1) / len(layers), name)
    for i, (name, _) in enumerate(layers):
        codes = broadcast(stored.get(i), src=i % here.size) if here.active else stored[i]
        set_module(out, name, CodedLinear.from_stored(*codes, shapes[i][1], shapes[i][0]))
    write_codec_table(out)
    return from_bytes(out)


def from_bytes(model: nn.Module) -> nn.Module:
    """The model rebuilt from its state_dict's bytes alone (the file's content), in eval mode."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = coded_model_from_state(_uncoded_copy(model), state)
    fresh.load_state_dict(state, strict=True)
    return fresh.to(model_device(model)).eval()


def _uncoded_copy(model: nn.Module) -> nn.Module:
    from forge.nn import build_model

    return build_model(model.config.to_dict())


def seedlm_stage(model, preserve, cfg, progress: Progress) -> nn.Module:
    encode = lambda name, layer, w: seedlm_encode(w, C=cfg.seedlm_block_size, P=cfg.seedlm_coefficients,
                                                  K=cfg.seedlm_seed_bits, num_seeds=cfg.seedlm_seeds)
    return _recode(model, preserve, encode, progress)


def layer_inputs(model: nn.Module, names, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs each named layer sees when `model` reads `tokens` (padding positions included: the model
    attends causally, so pads after a row's end never change its real positions)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: seen.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for n in names]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {n: torch.cat(seen[n]) for n in names}


def vptq_stage(model, preserve, cfg, tokens: torch.Tensor, progress: Progress) -> nn.Module:
    inputs = layer_inputs(model.eval(), list(compressible_linears(model, preserve)), tokens)
    encode = lambda name, layer, w: vptq_quantize(
        w, hessian_from_inputs(inputs[name]), v=cfg.vptq_vector_dim, k=cfg.vptq_codebook_size,
        k_res=cfg.vptq_residual_codebook_size, iters=cfg.vptq_kmeans_iters, seed=cfg.seed)
    return _recode(model, preserve, encode, progress)


def _hyper_codes(cfg):
    def encode(name, layer, weight):
        codes = getattr(layer, "codes", None)
        if isinstance(codes, VQCodes):
            return hyper_vq(codes, cfg.hyper_dims, cfg.hyper_bits)
        return hyper_encode(weight, cfg.hyper_dims, cfg.hyper_bits)
    return encode


def hyper_stage(model, preserve, cfg, progress: Progress) -> nn.Module:
    return _recode(model, preserve, _hyper_codes(cfg), progress)
