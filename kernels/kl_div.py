"""Triton kernels for KL(softmax(t/T) || softmax(s/T)) per row of raw logits (math in forge/ops/kl_div.py).

Forward: one program per row walks the row in BLOCK-wide tiles with an online softmax (Milakov &
Gimelshein 2018) for both inputs, so each logit is read once. Backward: one program per (row, tile)
writes (softmax(s/T) - softmax(t/T)) * row_scale from the saved log-sum-exps; the gradient may be the
student buffer itself (each tile is loaded before it is stored). Plain pointer arithmetic only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1024 elements a tile: a 4 KiB fp32 row slice per input; Liger-Kernel's KL/CE kernels use tiles of
# this size (next power of two of the vocabulary, capped at 32768 / element size) without autotuning.
BLOCK = 1024


@triton.jit
def kl_div_forward_kernel(s_ptr, t_ptr, keep_ptr, loss_ptr, lse_s_ptr, lse_t_ptr, vocab, s_stride, t_stride,
                          inv_t, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    end = vocab
    if HAS_MASK:
        end = tl.where(tl.load(keep_ptr + row) != 0, vocab, 0)  # a masked row skips the loop
    s_row = s_ptr + row.to(tl.int64) * s_stride
    t_row = t_ptr + row.to(tl.int64) * t_stride
    ms = float("-inf")
    mt = float("-inf")
    zs = 0.0
    zt = 0.0
    a = 0.0
    for j in range(0, end, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        inside = offs < vocab
        x = tl.load(s_row + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        y = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        new_ms = tl.maximum(ms, tl.max(x, 0))
        new_mt = tl.maximum(mt, tl.max(y, 0))
        fs = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - new_ms))
        ft = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - new_mt))
        es = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_ms))
        et = tl.where(y == float("-inf"), 0.0, tl.exp(y - new_mt))
        zs = zs * fs + tl.sum(es, 0)
        zt = zt * ft + tl.sum(et, 0)
        a = a * ft + tl.sum(tl.where(et > 0.0, et * (y - x), 0.0), 0)  # p_i = 0 adds 0 even where y = -inf
        ms = new_ms
        mt = new_mt
    kept = end > 0
    loss = a / zt - (mt - ms) - tl.log(zt / zs)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_s_ptr + row, tl.where(kept, ms + tl.log(zs), 0.0))
    tl.store(lse_t_ptr + row, tl.where(kept, mt + tl.log(zt), 0.0))


@triton.jit
def kl_div_backward_kernel(s_ptr, t_ptr, g_ptr, lse_s_ptr, lse_t_ptr, scale_ptr, vocab, s_stride, t_stride,
                           g_stride, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab
    r64 = row.to(tl.int64)
    scale = tl.load(scale_ptr + row)
    x = tl.load(s_ptr + r64 * s_stride + offs, mask=inside, other=0.0).to(tl.float32) * inv_t
    y = tl.load(t_ptr + r64 * t_stride + offs, mask=inside, other=0.0).to(tl.float32) * inv_t
    grad = (tl.exp(x - tl.load(lse_s_ptr + row)) - tl.exp(y - tl.load(lse_t_ptr + row))) * scale
    grad = tl.where(scale == 0.0, 0.0, grad)
    tl.store(g_ptr + r64 * g_stride + offs, grad.to(g_ptr.dtype.element_ty), mask=inside)


def kl_div_forward_triton(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None, inv_t: float,
                          loss: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor) -> None:
    rows, vocab = s.shape
    if rows == 0:
        return
    kl_div_forward_kernel[(rows,)](s, t, keep if keep is not None else loss, loss, lse_s, lse_t, vocab,
                                   s.stride(0), t.stride(0), float(inv_t), HAS_MASK=keep is not None, BLOCK=BLOCK)


def kl_div_backward_triton(s, t, lse_s, lse_t, row_scale, inv_t: float, out) -> None:
    rows, vocab = s.shape
    if rows == 0:
        return
    grid = (rows, triton.cdiv(vocab, BLOCK))
    kl_div_backward_kernel[grid](s, t, out, lse_s, lse_t, row_scale, vocab, s.stride(0), t.stride(0),
                                 out.stride(0), float(inv_t), BLOCK=BLOCK)
