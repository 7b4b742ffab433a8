"""QK-clip, the logit cap of MuonClip (Kimi K2 report, arXiv 2507.20534, section 2.1, algorithm 1).

After an optimizer step, every attention head h whose largest pre-softmax logit S_max^h in the last
forward exceeded the threshold tau gets its query and key projections rescaled in place:

    gamma_h = tau / S_max^h ,   W_q^h <- sqrt(gamma_h) W_q^h ,   W_k^h <- sqrt(gamma_h) W_k^h

(biases of those rows too). Each logit of head h is q_i . k_j / sqrt(d), bilinear in (W_q x, W_k x),
RoPE included, so every logit of h is multiplied by gamma_h and the head's maximum lands on tau.
Heads at or below tau are not touched at all. Splitting gamma evenly between q and k, as the report
does for multi-head attention, keeps the two weight scales balanced.

QK-clip knows no model class: it works on any module that implements `QKLogitRecorder`.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from forge.ops._validate import check_finite_number
from forge.optim import sharding


class QKLogitRecorder(Protocol):
    """What QK-clip needs of an attention module (checked by `records_qk_logits`, duck-typed).

    max_logits: float tensor of shape (n_heads,): each head's largest pre-softmax logit over the
        last forward's batch (-inf before the first forward). Under torch.distributed the optimizer
        all-reduces it in place (MAX) before clipping.
    qk_head_slices(head): the rows of the query and key projections (weights, then biases if any)
        that produce `head`, as detached views sharing the parameters' storage; QK-clip scales them
        in place. The head's logits must be bilinear in those q and k rows.
    """

    max_logits: torch.Tensor

    def qk_head_slices(self, head: int) -> list[torch.Tensor]: ...


def records_qk_logits(module) -> bool:
    """True when `module` implements `QKLogitRecorder` (a `max_logits` tensor and `qk_head_slices`)."""
    return isinstance(getattr(module, "max_logits", None), torch.Tensor) and callable(
        getattr(module, "qk_head_slices", None))


def qk_logit_recorders(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` (itself included) that implement `QKLogitRecorder`, in `modules()` order."""
    return [m for m in model.modules() if records_qk_logits(m)]


def qk_clip_(module: QKLogitRecorder, threshold: float) -> int:
    """Clip the heads of `module` whose recorded `max_logits` exceed `threshold`; returns how many.

    Reads the logits recorded by the module's last forward (nothing happens before the first one,
    while they are -inf). The record is not reset, so call this once per step, after the step.
    Non-finite records (an overflowed forward) are skipped rather than zeroing the head.
    """
    if not records_qk_logits(module):
        raise TypeError(f"module must implement QKLogitRecorder (a max_logits tensor and qk_head_slices), "
                        f"got {type(module).__name__}")
    tau = check_finite_number("threshold", threshold, low=0.0, low_open=True)
    clipped = 0
    with torch.no_grad():
        for head, peak in enumerate(module.max_logits.tolist()):  # one device sync for all heads
            if not (math.isfinite(peak) and peak > tau):
                continue
            scale = math.sqrt(tau / peak)
            for rows in module.qk_head_slices(head):
                rows.mul_(scale)
            clipped += 1
    return clipped


def qk_clip_sharded_(module: QKLogitRecorder, threshold: float) -> int:
    """`qk_clip_` of a module whose parameters are DTensors (FSDP2 shards), where a slice of a parameter is a copy,
    not a view, so scaling it changes nothing: full-size ones tensors stand in for the sharded parameters while
    `qk_clip_` runs, which turns them into each entry's scale, and each rank multiplies its own part by its part of
    the scales. `max_logits` must already be the same on every rank (MuonGrokfast all-reduces it)."""
    tau = check_finite_number("threshold", threshold, low=0.0, low_open=True)
    if not any(math.isfinite(peak) and peak > tau for peak in module.max_logits.tolist()):
        return 0
    dtensor = sharding.dtensor_class()
    owners = [(holder, name, p) for holder in module.modules() for name, p in holder._parameters.items()
              if dtensor is not None and isinstance(p, dtensor)]
    scales = [torch.ones(p.shape, dtype=torch.float32, device=p.to_local().device) for _, _, p in owners]
    for (holder, name, _), scale in zip(owners, scales):
        holder._parameters[name] = scale
    try:
        clipped = qk_clip_(module, tau)
    finally:
        for holder, name, p in owners:
            holder._parameters[name] = p
    with torch.no_grad():
        for (_, _, p), scale in zip(owners, scales):
            p.to_local().mul_(sharding.local_part(scale, p))
    return clipped
