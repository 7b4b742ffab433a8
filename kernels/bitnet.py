"""Triton kernels for BitNet b1.58 (forge/ops/bitnet.py holds the formulas and the packed layout).

- ternary: a partial |w| sum per block (`abs_partial_sums_triton`), the float64 group sums and the scale
  in torch by the launcher (a few values), then one pass writing int8 q or q * scale
  (`ternary_apply_triton`). Two passes over w are the minimum: the scale is a whole-group mean.
- activations: one program per token row, absmax pass then quantize pass (the row stays in cache).
- ternary_linear: one program per (block of output rows, token); packed bytes decoded with shifts and
  masks against the four contiguous int8 activation quarters, int32 accumulation.

round-half-to-even without libdevice (which the CPU interpreter lacks): adding and subtracting 1.5 * 2**23
rounds an fp32 value of magnitude < 2**22 to the nearest integer, ties to even (IEEE round-to-nearest).
Divisions use tl.div_rn so that they are correctly rounded, like torch's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round_clip(v, bound):
    v = tl.minimum(tl.maximum(v, -bound - 1.0), bound + 1.0)
    r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23
    return tl.minimum(tl.maximum(r, -bound), bound)


@triton.jit
def abs_partial_kernel(w_ptr, partial_ptr, group_size, per_group, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = (pid // per_group).to(tl.int64)
    offs = (pid % per_group).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w_ptr + g * group_size + offs, mask=offs < group_size, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(tl.abs(v), axis=0))


@triton.jit
def ternary_apply_kernel(w_ptr, scale_ptr, out_ptr, group_size, per_group, DEQUANTIZE: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = (pid // per_group).to(tl.int64)
    offs = (pid % per_group).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < group_size
    s = tl.load(scale_ptr + g)
    v = tl.load(w_ptr + g * group_size + offs, mask=mask, other=0.0)
    q = _round_clip(tl.div_rn(v.to(tl.float32), s), 1.0)
    if DEQUANTIZE:
        tl.store(out_ptr + g * group_size + offs, (q * s).to(v.dtype), mask=mask)
    else:
        tl.store(out_ptr + g * group_size + offs, q.to(tl.int8), mask=mask)


@triton.jit
def act_quant_kernel(x_ptr, scale_ptr, out_ptr, cols, out_stride, eps, DEQUANTIZE: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best = tl.zeros([BLOCK], tl.float32)
    nans = tl.zeros([BLOCK], tl.float32)  # NaN where a NaN was seen: torch.amax propagates it
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(x_ptr + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32))
        best = tl.maximum(best, v)
        nans += tl.where(v != v, v, 0.0)
    amax = tl.max(best, axis=0) + tl.sum(nans, axis=0)
    s = tl.div_rn(tl.where(amax < eps, eps, amax), 127.0)
    tl.store(scale_ptr + row, s)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * cols + offs, mask=offs < cols, other=0.0)
        q = _round_clip(tl.div_rn(v.to(tl.float32), s), 127.0)
        if DEQUANTIZE:
            tl.store(out_ptr + row * out_stride + offs, (q * s).to(v.dtype), mask=offs < cols)
        else:
            tl.store(out_ptr + row * out_stride + offs, q.to(tl.int8), mask=offs < cols)


@triton.jit
def ternary_linear_kernel(xq_ptr, xs_ptr, packed_ptr, ws_ptr, ws_stride, y_ptr, n, kb,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    acc = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, kb, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < kb
        p = tl.load(packed_ptr + rows[:, None] * kb + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=1).to(tl.int32)
        for i in tl.static_range(4):
            x = tl.load(xq_ptr + r * 4 * kb + i * kb + cols, mask=col_mask, other=0).to(tl.int32)
            acc += tl.sum((((p >> (2 * i)) & 3) - 1) * x[None, :], axis=1)
    y = (acc.to(tl.float32) * tl.load(xs_ptr + r)) * tl.load(ws_ptr + rows * ws_stride, mask=row_mask, other=0.0)
    tl.store(y_ptr + r * n + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def abs_partial_sums_triton(w: torch.Tensor, groups: int) -> torch.Tensor:
    """float32 (groups, ceil(group_size / BLOCK)): sums of |w| over BLOCK-wide pieces of each group of a
    contiguous w split into `groups` equal groups."""
    size = w.numel() // groups
    per_group = triton.cdiv(size, BLOCK)
    partial = torch.empty(groups * per_group, dtype=torch.float32, device=w.device)
    abs_partial_kernel[(groups * per_group,)](w, partial, size, per_group, BLOCK=BLOCK)
    return partial.view(groups, per_group)


def ternary_apply_triton(w: torch.Tensor, scale: torch.Tensor, groups: int, dequantize: bool) -> torch.Tensor:
    """int8 q = clamp(round(w / scale), -1, 1), or q * scale in w's dtype, for a contiguous w split into
    `groups` equal groups with one float32 scale each."""
    size = w.numel() // groups
    per_group = triton.cdiv(size, BLOCK)
    out = torch.empty_like(w) if dequantize else torch.empty(w.shape, dtype=torch.int8, device=w.device)
    ternary_apply_kernel[(groups * per_group,)](w, scale, out, size, per_group, DEQUANTIZE=dequantize, BLOCK=BLOCK)
    return out


def _act_into(x: torch.Tensor, eps: float, out: torch.Tensor, out_stride: int, dequantize: bool) -> torch.Tensor:
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    block = min(BLOCK * 4, triton.next_power_of_2(x.shape[1]))
    act_quant_kernel[(x.shape[0],)](x, scale, out, x.shape[1], out_stride, eps, DEQUANTIZE=dequantize, BLOCK=block)
    return scale


def act_quant_triton(x: torch.Tensor, eps: float, dequantize: bool):
    """(int8 q or q * scale, float32 scale per row) for a contiguous (rows, cols) x."""
    out = torch.empty_like(x) if dequantize else torch.empty(x.shape, dtype=torch.int8, device=x.device)
    return out, _act_into(x, eps, out, x.shape[1], dequantize)


def ternary_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """y (m, n) from contiguous x (m, k), packed (n, ceil(k / 4)), scale (1,) or (n,)."""
    n, kb = packed.shape
    xq = torch.zeros(x.shape[0], 4 * kb, dtype=torch.int8, device=x.device)  # zero padding meets code 1
    xs = _act_into(x, eps, xq, 4 * kb, False)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block_n, block_k = 32, min(128, triton.next_power_of_2(kb))
    grid = (triton.cdiv(n, block_n), x.shape[0])
    ternary_linear_kernel[grid](xq, xs, packed, scale, int(scale.numel() > 1), y, n, kb, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
