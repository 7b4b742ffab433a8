"""Triton kernel for the symmetric products of Newton-Schulz: C = alpha * A @ B^T + beta * D.

Only the tiles on and below the diagonal are computed; each off-diagonal tile is stored twice
(itself and its transpose), so X X^T and the other symmetric products cost about half a GEMM
(the flash-muon / Dion `ns_line_1` idea). Batched over the leading dimension with 64-bit offsets.
Plain pointer arithmetic (no block pointers: they are gone in Triton 3.9). Where too few tiles would
fill the GPU (`use_dense`), the launcher in forge/ops/newton_schulz.py runs one dense GEMM instead.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from forge.kernels import interpreted


@triton.jit
def _tile_coords(pid):
    """Tile (i, j), j <= i, of the pid-th lower-triangular tile in row-major order."""
    i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    return i, pid - i * (i + 1) // 2


@triton.jit
def sym_mm_kernel(a_ptr, b_ptr, d_ptr, c_ptr, M, K,
                  s_ab, s_am, s_ak, s_bb, s_bm, s_bk, s_db, s_dm, s_dn, s_cb, s_cm, s_cn,
                  alpha, beta,
                  HAS_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    i, j = _tile_coords(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + batch * s_ab + rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ak
    b_tile = b_ptr + batch * s_bb + cols[None, :].to(tl.int64) * s_bm + ks[:, None] * s_bk
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_tile, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_tile, mask=(cols[None, :] < M) & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * s_ak
        b_tile += BLOCK_K * s_bk
    acc = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_D:
        d = tl.load(d_ptr + batch * s_db + rows[:, None].to(tl.int64) * s_dm + cols[None, :] * s_dn, mask=inside, other=0.0)
        acc += beta * d.to(tl.float32)
    out = acc.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + batch * s_cb
    tl.store(c_base + rows[:, None].to(tl.int64) * s_cm + cols[None, :] * s_cn, out, mask=inside)
    if i != j:
        tl.store(c_base + cols[None, :].to(tl.int64) * s_cm + rows[:, None] * s_cn, out, mask=inside)


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter gets small tiles (it runs every program serially on the CPU).

    GPU: 128 x 128 x 64 tiles, 8 warps, 3 stages, chosen by benchmarks/gpu/sweep_ns.py (H100, bf16 X X^T):
    the fastest of five configs at 1x4096x4096 and 24x768x3072; 64-row tiles peaked lower and 256-row
    tiles ran out of shared memory (timings in benchmarks/RESULTS.md, "Measurements behind kernel
    constants"). float32 takes BLOCK_K 32 to keep 3 stages in shared memory.
    """
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_K=16, num_warps=1, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_K=32 if dtype == torch.float32 else 64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_dense(batch: int, M: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True where the default tiles leave the GPU underfilled, so cuBLAS's dense product is faster:
    fewer than 3 lower-triangle tiles per SM (the same sweep: 1x2048x8192, 136 tiles on 132 SMs, lost
    to dense; 1x4096x4096 and 24x768x3072, over 500 tiles, won). Never on the CPU interpreter."""
    if device.type != "cuda":
        return False
    tiles = triton.cdiv(M, _config(dtype)["BLOCK_M"])
    return batch * tiles * (tiles + 1) // 2 < 3 * _sm_count(device.index or 0)


def sym_mm_triton(A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
                  D: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """alpha * A @ B^T + beta * D for batches A, B (b, M, K) whose result is symmetric (b, M, M).

    Always runs the kernel (the caller checks `use_dense` first). `config` overrides the tile sizes
    (BLOCK_M, BLOCK_K, num_warps, num_stages), for sweeps.
    """
    batch, M, K = A.shape
    cfg = config or _config(A.dtype)
    C = torch.empty(batch, M, M, dtype=A.dtype, device=A.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    grid = (tiles * (tiles + 1) // 2, batch)
    ieee = A.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    Dv = D if D is not None else C
    sym_mm_kernel[grid](A, B, Dv, C, M, K, *A.stride(), *B.stride(), *Dv.stride(), *C.stride(),
                        float(alpha), float(beta), HAS_D=D is not None, IEEE=ieee, **cfg)
    return C
