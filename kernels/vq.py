"""Triton kernels for VQ weights (forge/ops/vq.py holds the layout and the reference).

- vq_decode: one program per (row group g, block of input columns): W[g v + r, j] = scale[j] (C[idx] + C_res[res]).
- vq_linear: one program per (row group g, activation row i): the codewords of group g gathered a block of
  columns at a time and contracted with x[i] (x scaled by the column scale), so W is never formed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codewords(idx_ptr, book_ptr, res_ptr, res_book_ptr, g, cols, col_mask, r, v, n_in, HAS_RES: tl.constexpr):
    """(BLOCK_J, V_PAD) codewords of vectors (g, cols), plus the residual codewords."""
    rmask = r < v
    mask = col_mask[:, None] & rmask[None, :]
    i = tl.load(idx_ptr + g * n_in + cols, mask=col_mask, other=0).to(tl.int64)
    vec = tl.load(book_ptr + i[:, None] * v + r[None, :], mask=mask, other=0.0)
    if HAS_RES:
        j = tl.load(res_ptr + g * n_in + cols, mask=col_mask, other=0).to(tl.int64)
        vec += tl.load(res_book_ptr + j[:, None] * v + r[None, :], mask=mask, other=0.0)
    return vec


@triton.jit
def vq_decode_kernel(idx_ptr, book_ptr, res_ptr, res_book_ptr, scale_ptr, w_ptr, n_out, n_in, v,
                     HAS_RES: tl.constexpr, BLOCK_J: tl.constexpr, V_PAD: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < n_in
    r = tl.arange(0, V_PAD)
    vec = _codewords(idx_ptr, book_ptr, res_ptr, res_book_ptr, g, cols, col_mask, r, v, n_in, HAS_RES)
    vec = vec * tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[:, None]
    rows = g * v + r
    mask = col_mask[:, None] & ((r < v) & (rows < n_out))[None, :]
    tl.store(w_ptr + rows[None, :] * n_in + cols[:, None], vec, mask=mask)


@triton.jit
def vq_linear_kernel(x_ptr, idx_ptr, book_ptr, res_ptr, res_book_ptr, scale_ptr, y_ptr, n_out, n_in, v,
                     HAS_RES: tl.constexpr, BLOCK_J: tl.constexpr, V_PAD: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, V_PAD)
    acc = tl.zeros([V_PAD], tl.float32)
    for start in range(0, n_in, BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        col_mask = cols < n_in
        vec = _codewords(idx_ptr, book_ptr, res_ptr, res_book_ptr, g, cols, col_mask, r, v, n_in, HAS_RES)
        x = tl.load(x_ptr + i * n_in + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = x * tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        acc += tl.sum(x[:, None] * vec, axis=0)
    rows = g * v + r
    tl.store(y_ptr + i * n_out + rows, acc, mask=(r < v) & (rows < n_out))


def _args(idx, codebook, res_idx, res_codebook):
    has_res = res_idx is not None
    return (idx, codebook, res_idx if has_res else idx, res_codebook if has_res else codebook), has_res


def vq_decode_triton(idx, codebook, scale, out_features, res_idx=None, res_codebook=None) -> torch.Tensor:
    """W (out_features, in) float32 from contiguous codes."""
    groups, n_in = idx.shape
    v = codebook.shape[1]
    w = torch.empty(out_features, n_in, dtype=torch.float32, device=idx.device)
    args, has_res = _args(idx, codebook, res_idx, res_codebook)
    grid = (groups, triton.cdiv(n_in, 64))
    vq_decode_kernel[grid](*args, scale, w, out_features, n_in, v, HAS_RES=has_res, BLOCK_J=64,
                           V_PAD=triton.next_power_of_2(v))
    return w


def vq_linear_triton(x, idx, codebook, scale, out_features, res_idx=None, res_codebook=None) -> torch.Tensor:
    """y (m, out_features) float32 from contiguous x (m, in) and codes."""
    groups, n_in = idx.shape
    v = codebook.shape[1]
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    args, has_res = _args(idx, codebook, res_idx, res_codebook)
    vq_linear_kernel[(groups, x.shape[0])](x, *args, scale, y, out_features, n_in, v, HAS_RES=has_res,
                                           BLOCK_J=min(128, triton.next_power_of_2(n_in)),
                                           V_PAD=triton.next_power_of_2(v))
    return y
