"""Triton kernels for SeedLM (forge/ops/seedlm.py holds the formulas and the reference).

- seedlm_search: one program per BLOCK_B blocks walks every candidate seed: t = U^+ w from the seed's row of a
  (seeds, P, C) pseudo-inverse table (built once per (K, C, P) by the launcher, on the device; never a
  blocks x seeds tensor), the shared exponent read from max|t|'s bits, q = round(clamp(t 2^-e, -8, 7)), the
  error ||w - U q 2^e||^2, and a running minimum (strictly lower: ties keep the earlier seed).
- seedlm_decode / seedlm_linear: the basis of a seed is a window of the normalized LFSR walk (a 2^K table);
  the linear kernel rebuilds each weight from its block's seed and coefficients inside the dot product.
round-half-to-even by the 1.5 * 2^23 trick (no libdevice on the CPU interpreter); 2^e by building the float's
exponent bits, exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pow2(e):
    """2^e as float32 for int32 e in [-126, 127], exact."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(t, P_PAD: tl.constexpr):
    """(q, e, t_hat) of coefficient rows t (BLOCK_B, P_PAD): e = clamp(ceil(log2(max|t| / 7.5)), -8, 7)."""
    amax = tl.max(tl.abs(t), axis=1)
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 129 + ((bits & 0x7FFFFF) > 0x700000).to(tl.int32)
    e = tl.minimum(tl.maximum(e, -8), 7)
    x = tl.minimum(tl.maximum(t * _pow2(-e)[:, None], -8.0), 7.0)
    q = (x + 12582912.0) - 12582912.0
    return q, e, q * _pow2(e)[:, None]


@triton.jit
def seedlm_search_kernel(w_ptr, ut_ptr, pinv_ptr, best_ptr, q_ptr, e_ptr, err_ptr, n, C, P, num_seeds,
                         BLOCK_B: tl.constexpr, C_PAD: tl.constexpr, P_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.arange(0, C_PAD)
    p = tl.arange(0, P_PAD)
    bmask = b < n
    w = tl.load(w_ptr + b[:, None] * C + c[None, :], mask=bmask[:, None] & (c < C)[None, :], other=0.0)
    tile_mask = (p < P)[:, None] & (c < C)[None, :]
    best_err = tl.full([BLOCK_B], float("inf"), tl.float32)
    best_s = tl.zeros([BLOCK_B], tl.int32)
    best_e = tl.full([BLOCK_B], -8, tl.int32)
    best_q = tl.zeros([BLOCK_B, P_PAD], tl.float32)
    for s in range(num_seeds):
        offs = s * P * C + p[:, None] * C + c[None, :]
        pinv = tl.load(pinv_ptr + offs, mask=tile_mask, other=0.0)          # (P_PAD, C_PAD) = U^+
        ut = tl.load(ut_ptr + offs, mask=tile_mask, other=0.0)              # (P_PAD, C_PAD) = U^T
        t = tl.sum(w[:, None, :] * pinv[None, :, :], axis=2)                # (BLOCK_B, P_PAD)
        q, e, t_hat = _quantize(t, P_PAD)
        r = w - tl.sum(t_hat[:, :, None] * ut[None, :, :], axis=1)         # (BLOCK_B, C_PAD)
        err = tl.sum(r * r, axis=1)
        better = err < best_err
        best_err = tl.where(better, err, best_err)
        best_s = tl.where(better, s, best_s)
        best_e = tl.where(better, e, best_e)
        best_q = tl.where(better[:, None], q, best_q)
    tl.store(best_ptr + b, best_s, mask=bmask)
    tl.store(e_ptr + b, best_e.to(tl.int8), mask=bmask)
    tl.store(err_ptr + b, best_err, mask=bmask)
    tl.store(q_ptr + b[:, None] * P + p[None, :], best_q.to(tl.int8), mask=bmask[:, None] & (p < P)[None, :])


@triton.jit
def _weights(walk_ptr, pos_ptr, seeds_ptr, q_ptr, e_ptr, f, mask, C, P):
    """Decoded weights at flattened positions f (any shape): block f // C, row f % C of its basis."""
    blk = f // C
    row = f % C
    base = tl.load(pos_ptr + tl.load(seeds_ptr + blk, mask=mask, other=1), mask=mask, other=0).to(tl.int64) + 1
    scale = _pow2(tl.load(e_ptr + blk, mask=mask, other=0).to(tl.int32))
    acc = tl.zeros(f.shape, tl.float32)
    for j in range(P):
        u = tl.load(walk_ptr + base + row * P + j, mask=mask, other=0.0)
        acc += u * (tl.load(q_ptr + blk * P + j, mask=mask, other=0).to(tl.float32) * scale)
    return acc


@triton.jit
def seedlm_decode_kernel(walk_ptr, pos_ptr, seeds_ptr, q_ptr, e_ptr, out_ptr, total, C, P, BLOCK: tl.constexpr):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = f < total
    tl.store(out_ptr + f, _weights(walk_ptr, pos_ptr, seeds_ptr, q_ptr, e_ptr, f, mask, C, P), mask=mask)


@triton.jit
def seedlm_linear_kernel(x_ptr, walk_ptr, pos_ptr, seeds_ptr, q_ptr, e_ptr, y_ptr, n_out, k, C, P,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = (rows < n_out)[:, None] & (cols < k)[None, :]
        w = _weights(walk_ptr, pos_ptr, seeds_ptr, q_ptr, e_ptr, rows[:, None] * k + cols[None, :], mask, C, P)
        x = tl.load(x_ptr + i * k + cols, mask=cols < k, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + i * n_out + rows, acc, mask=rows < n_out)


def seedlm_search_triton(blocks, ut, pinv, num_seeds):
    """(walk index of the best seed int32, q int8, e int8, err float32) for contiguous float32 blocks (n, C);
    ut, pinv: (num_seeds, P, C) float32 on the blocks' device."""
    n, C = blocks.shape
    P = ut.shape[1]
    best = torch.empty(n, dtype=torch.int32, device=blocks.device)
    q = torch.empty(n, P, dtype=torch.int8, device=blocks.device)
    e = torch.empty(n, dtype=torch.int8, device=blocks.device)
    err = torch.empty(n, dtype=torch.float32, device=blocks.device)
    block_b = 16
    seedlm_search_kernel[(triton.cdiv(n, block_b),)](blocks, ut, pinv, best, q, e, err, n, C, P, num_seeds,
                                                    BLOCK_B=block_b, C_PAD=triton.next_power_of_2(C),
                                                    P_PAD=triton.next_power_of_2(P))
    return best, q, e, err


def seedlm_decode_triton(walk, position, seeds, q, e, C):
    n, P = q.shape
    out = torch.empty(n, C, dtype=torch.float32, device=seeds.device)
    seedlm_decode_kernel[(triton.cdiv(n * C, 256),)](walk, position, seeds, q, e, out, n * C, C, P, BLOCK=256)
    return out


def seedlm_linear_triton(x, walk, position, seeds, q, e, out_features, C):
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, 16), m)
    seedlm_linear_kernel[grid](x, walk, position, seeds, q, e, y, out_features, k, C, q.shape[1], BLOCK_N=16,
                               BLOCK_K=min(64, triton.next_power_of_2(k)))
    return y
