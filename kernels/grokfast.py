"""Triton kernels for the Grokfast filters over whole lists of tensors, one launch per dtype group.

Each program takes one chunk of BLOCK elements. Two int64 device tables, which the launcher in
forge/ops/grokfast.py builds once per list of tensors and caches, say which tensor, by address, and
which offset each chunk is; addresses are loaded as int64 and cast to pointers, so no tensor is copied
into a flat buffer.
- ptrs (k + 1, n): row j holds the addresses of the j-th tensor list (grads, then state), the last row
  the element counts.
- chunks (2, n_chunks): from `chunk_table_builder`; row 0 the tensor slot, row 1 the first element.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 1024
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _chunk(chunks, BLOCK: tl.constexpr):
    """(tensor slot, element offsets) of this program's chunk; chunks rows: tensor slot, first element."""
    c = tl.program_id(0)
    return tl.load(chunks + c), tl.load(chunks + tl.num_programs(0) + c) + tl.arange(0, BLOCK)


@triton.jit
def grokfast_ema_kernel(ptrs, chunks, n_tensors, alpha, lamb,
                        GRAD_T: tl.constexpr, STATE_T: tl.constexpr, BLOCK: tl.constexpr):
    t, offs = _chunk(chunks, BLOCK)
    g_ptr = tl.load(ptrs + t).to(tl.pointer_type(GRAD_T))
    e_ptr = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(STATE_T))
    mask = offs < tl.load(ptrs + 2 * n_tensors + t)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    e = (alpha * tl.load(e_ptr + offs, mask=mask).to(tl.float32) + (1.0 - alpha) * g).to(STATE_T)
    tl.store(e_ptr + offs, e, mask=mask)
    tl.store(g_ptr + offs, (g + lamb * e.to(tl.float32)).to(GRAD_T), mask=mask)


@triton.jit
def grokfast_ma_kernel(ptrs, chunks, n_tensors, slot, scale, lamb,
                       GRAD_T: tl.constexpr, RING_T: tl.constexpr, BLOCK: tl.constexpr):
    t, offs = _chunk(chunks, BLOCK)
    numel = tl.load(ptrs + 3 * n_tensors + t)
    g_ptr = tl.load(ptrs + t).to(tl.pointer_type(GRAD_T))
    r_ptr = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(RING_T)) + slot * numel
    s_ptr = tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    stored = g.to(RING_T)
    s = tl.load(s_ptr + offs, mask=mask) + (stored.to(tl.float32) - tl.load(r_ptr + offs, mask=mask).to(tl.float32))
    tl.store(r_ptr + offs, stored, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)
    tl.store(g_ptr + offs, (g + lamb * scale * s).to(GRAD_T), mask=mask)


@functools.lru_cache(maxsize=None)
def chunk_table_builder(device: str):
    """`build(rows)` -> the chunks table on `device`, from the element counts in rows[-1] (one object per
    device, so a table cache can key on it)."""
    def build(rows):
        numels = torch.tensor(rows[-1], dtype=torch.int64)
        counts = (numels + BLOCK - 1) // BLOCK
        slots = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        offsets = (torch.arange(len(slots)) - first) * BLOCK
        return torch.stack([slots, offsets]).to(device)

    return build


def _launch(kernel, ptrs, chunks, n_tensors: int, dtypes, *scalars) -> None:
    kernel[(chunks.shape[1],)](ptrs, chunks, n_tensors, *scalars, *(_TL_DTYPES[d] for d in dtypes), BLOCK=BLOCK)


def grokfast_ema_triton(ptrs, chunks, n_tensors: int, dtypes, alpha: float, lamb: float) -> None:
    """One dtype group: ptrs rows (grads, emas, numels); dtypes (grad dtype, ema dtype)."""
    _launch(grokfast_ema_kernel, ptrs, chunks, n_tensors, dtypes, float(alpha), float(lamb))


def grokfast_ma_triton(ptrs, chunks, n_tensors: int, dtypes, slot: int, scale: float, lamb: float) -> None:
    """One dtype group: ptrs rows (grads, rings, sums, numels); dtypes (grad dtype, ring dtype)."""
    _launch(grokfast_ma_kernel, ptrs, chunks, n_tensors, dtypes, int(slot), float(scale), float(lamb))
