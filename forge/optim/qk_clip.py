"""QK-clip, the logit cap of MuonClip (Kimi K2 report, arXiv 2507.20534, section 2.1, algorithm 1).

After an optimizer step, every attention head h whose largest pre-softmax logit S_max^h in the last
forward exceeded the threshold tau gets its query and key projections rescaled in place:

    gamma_h = tau / S_max^h ,   W_q^h <- sqrt(gamma_h) W_q^h ,   W_k^h <- sqrt(gamma_h) W_k^h

(biases of those rows too). Each logit of head h is q_i . k_j / sqrt(d), bilinear in (W_q x, W_k x),
RoPE included, so every logit of h is multiplied by gamma_h and the head's maximum lands on tau.
Heads at or below tau are not touched at all. Splitting gamma evenly between q and k, as the report
does for multi-head attention, keeps the two weight scales balanced.
"""
from __future__ import annotations

import math

import torch

from forge.nn.attention import CausalSelfAttention
from forge.ops._validate import check_finite_number


def qk_clip_(module: CausalSelfAttention, threshold: float) -> int:
    """Clip the heads of `module` whose recorded `max_logits` exceed `threshold`; returns how many.

    Reads the logits recorded by the module's last forward (nothing happens before the first one,
    while they are -inf). The record is not reset, so call this once per step, after the step.
    Non-finite records (an overflowed forward) are skipped rather than zeroing the head.
    """
    if not isinstance(module, CausalSelfAttention):
        raise TypeError(f"module must be a forge.nn.CausalSelfAttention, got {type(module).__name__}")
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
