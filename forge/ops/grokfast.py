"""Grokfast gradient filters (Lee, Kang, Kim, Lee 2024, "Grokfast: Accelerated Grokking by
Amplifying Slow Gradients", arXiv 2405.20233), in place over whole lists of tensors.

EMA:  ema <- alpha * ema + (1 - alpha) * g ;   g <- g + lamb * ema
MA:   g <- g + lamb * mean(last `window` gradients), the mean kept as a running sum in a ring
      buffer, so a step costs O(1) per element whatever the window (the paper's code sums a deque).

Both amplify the slow (low-frequency) component of the gradient: `g + lamb * ema`, never
`g + lamb * (g - ema)`, which amplifies the fast one (the seed system's bug).

The paper's code starts the EMA at the first gradient (step 1 gives (1 + lamb) * g): create the state
with `grokfast_ema_init(grads)` for that; a zero state starts damped instead.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_finite_number, check_float_tensor, check_paired_lists, check_tensor_list

# ---------------------------------------------------------------------------------------------
# References (float32 math, results rounded to each tensor's dtype, like every backend)
# ---------------------------------------------------------------------------------------------

def grokfast_ema_reference(grads, emas, alpha: float = 0.98, lamb: float = 2.0) -> None:
    """Per-tensor EMA filter in plain PyTorch; the definition the kernels are tested against."""
    for g, e in zip(grads, emas):
        e.copy_(alpha * e.float() + (1.0 - alpha) * g.float())
        g.copy_(g.float() + lamb * e.float())


def ma_slot_and_scale(step: int, window: int, warmup: bool) -> tuple[int, float]:
    """Ring slot of this step's gradient, and the factor that turns the running sum into the mean
    (0 while warming up: the paper's code applies the filter only once the window is full)."""
    count = min(step + 1, window)
    return step % window, (0.0 if warmup and count < window else 1.0 / count)


def grokfast_ma_reference(grads, rings, sums, step: int, lamb: float = 5.0, warmup: bool = True) -> None:
    """Per-tensor moving-average filter with a running sum, in plain PyTorch."""
    for g, ring, total in zip(grads, rings, sums):
        slot, scale = ma_slot_and_scale(step, ring.shape[0], warmup)
        stored = g.to(ring.dtype)
        total.add_(stored.float() - ring[slot].float())
        ring[slot] = stored
        g.copy_(g.float() + (lamb * scale) * total)


def grokfast_ema_init(grads, dtype: torch.dtype | None = torch.float32) -> list[torch.Tensor]:
    """EMA state started at the first gradient, as in the paper's code (None dtype: each grad's own)."""
    return [g.detach().to(dtype or g.dtype, copy=True, memory_format=torch.contiguous_format) for g in grads]


def grokfast_ma_init(grads, window: int, dtype: torch.dtype | None = None):
    """(rings, sums): zeroed ring buffers of shape (window, *g.shape) and float32 running sums."""
    rings = [torch.zeros((window, *g.shape), dtype=dtype or g.dtype, device=g.device) for g in grads]
    sums = [torch.zeros(g.shape, dtype=torch.float32, device=g.device) for g in grads]
    return rings, sums


# ---------------------------------------------------------------------------------------------
# Backend launchers
# ---------------------------------------------------------------------------------------------

def _with_contiguous(tensors: list[torch.Tensor], run) -> None:
    """Run a pointer kernel on contiguous stand-ins, then copy results into any non-contiguous originals."""
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    run(work)
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)


def _threads() -> int:
    return torch.get_num_threads()


@_dispatch.register("grokfast_ema", "torch")
def _grokfast_ema_torch(grads, emas, alpha, lamb):
    grokfast_ema_reference(grads, emas, alpha, lamb)


@_dispatch.register("grokfast_ema", "cpu")
def _grokfast_ema_cpu(grads, emas, alpha, lamb):
    n = len(grads)

    def run(work):
        g, e = work[:n], work[n:]
        _native.cpu_module().grokfast_ema(
            [t.data_ptr() for t in g], [t.data_ptr() for t in e], [t.numel() for t in g],
            [_native.dtype_code(t) for t in g], [_native.dtype_code(t) for t in e], alpha, lamb, _threads())

    _with_contiguous(list(grads) + list(emas), run)


@_dispatch.register("grokfast_ma", "torch")
def _grokfast_ma_torch(grads, rings, sums, step, lamb, warmup):
    grokfast_ma_reference(grads, rings, sums, step, lamb, warmup)


@_dispatch.register("grokfast_ma", "cpu")
def _grokfast_ma_cpu(grads, rings, sums, step, lamb, warmup):
    n = len(grads)
    slot, scale = ma_slot_and_scale(step, rings[0].shape[0], warmup)

    def run(work):
        g, r, s = work[:n], work[n:2 * n], work[2 * n:]
        _native.cpu_module().grokfast_ma(
            [t.data_ptr() for t in g], [t.data_ptr() for t in r], [t.data_ptr() for t in s],
            [t.numel() for t in g], [_native.dtype_code(t) for t in g], [_native.dtype_code(t) for t in r],
            slot, scale, lamb, _threads())

    _with_contiguous(list(grads) + list(rings) + list(sums), run)


# Device tables of pointers and sizes, keyed by the tensors' addresses: an optimizer passes the same
# tensors every step, so the table is built (and copied to the GPU) once.
_TABLES: OrderedDict = OrderedDict()


def device_table(rows: list[list[int]], device: torch.device, build=None) -> torch.Tensor:
    """A table for the kernels, on `device`, cached by `rows` (pointers and sizes).

    Without `build` the table is `rows` itself as int64 (len(rows), width); `build(rows)` may make
    another (e.g. per-chunk indices on the device).
    """
    key = (str(device), build, tuple(tuple(r) for r in rows))
    table = _TABLES.get(key)
    if table is None:
        table = build(rows) if build else torch.tensor(rows, dtype=torch.int64).to(device)
        _TABLES[key] = table
        if len(_TABLES) > 64:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def group_by_dtypes(*lists):
    """Indices of the tensors grouped by the dtypes of their i-th entries: one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, items in enumerate(zip(*lists)):
        groups.setdefault(tuple(t.dtype for t in items), []).append(i)
    return groups


def _chunk_starts(numels: list[int], chunk: int) -> list[int]:
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + (n + chunk - 1) // chunk)
    return starts


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@_dispatch.register("grokfast_ema", "cuda")
def _grokfast_ema_cuda(grads, emas, alpha, lamb):
    mod = _native.cuda_module()
    chunk = mod.grokfast_chunk_size()

    def run(work):
        n = len(work) // 2
        g, e = work[:n], work[n:]
        for idx in group_by_dtypes(g, e).values():
            numels = [g[i].numel() for i in idx]
            starts = _chunk_starts(numels, chunk)
            rows = [[g[i].data_ptr() for i in idx] + [0], [e[i].data_ptr() for i in idx] + [0], numels + [0], starts]
            table = device_table(rows, g[0].device)
            mod.grokfast_ema(table.data_ptr(), len(idx), starts[-1], _native.dtype_code(g[idx[0]]),
                             _native.dtype_code(e[idx[0]]), alpha, lamb, _stream(g[0].device))

    _with_contiguous(list(grads) + list(emas), run)


@_dispatch.register("grokfast_ma", "cuda")
def _grokfast_ma_cuda(grads, rings, sums, step, lamb, warmup):
    mod = _native.cuda_module()
    chunk = mod.grokfast_chunk_size()
    slot, scale = ma_slot_and_scale(step, rings[0].shape[0], warmup)

    def run(work):
        n = len(work) // 3
        g, r, s = work[:n], work[n:2 * n], work[2 * n:]
        for idx in group_by_dtypes(g, r).values():
            numels = [g[i].numel() for i in idx]
            starts = _chunk_starts(numels, chunk)
            rows = [[t[i].data_ptr() for i in idx] + [0] for t in (g, r, s)] + [numels + [0], starts]
            table = device_table(rows, g[0].device)
            mod.grokfast_ma(table.data_ptr(), len(idx), starts[-1], _native.dtype_code(g[idx[0]]),
                            _native.dtype_code(r[idx[0]]), slot, scale, lamb, _stream(g[0].device))

    _with_contiguous(list(grads) + list(rings) + list(sums), run)


def _launch_triton(launch, tensor_lists, dtype_lists, *scalars) -> None:
    """One Triton launch per dtype group, with the device tables the kernels read (kernels/grokfast.py):
    ptrs rows are each list's addresses, then the numels; chunks come from the kernel's own builder."""
    from forge.kernels.grokfast import chunk_table_builder

    first = tensor_lists[0]
    device = first[0].device
    for idx in group_by_dtypes(*dtype_lists).values():
        rows = [[lst[i].data_ptr() for i in idx] for lst in tensor_lists] + [[first[i].numel() for i in idx]]
        ptrs = device_table(rows, device)
        chunks = device_table([rows[-1]], device, build=chunk_table_builder(str(device)))
        launch(ptrs, chunks, len(idx), [lst[idx[0]].dtype for lst in dtype_lists], *scalars)


@_dispatch.register("grokfast_ema", "triton")
def _grokfast_ema_triton(grads, emas, alpha, lamb):
    from forge.kernels.grokfast import grokfast_ema_triton

    n = len(grads)
    _with_contiguous(list(grads) + list(emas),
                     lambda w: _launch_triton(grokfast_ema_triton, [w[:n], w[n:]], [w[:n], w[n:]], alpha, lamb))


@_dispatch.register("grokfast_ma", "triton")
def _grokfast_ma_triton(grads, rings, sums, step, lamb, warmup):
    from forge.kernels.grokfast import grokfast_ma_triton

    slot, scale = ma_slot_and_scale(step, rings[0].shape[0], warmup)
    n = len(grads)
    _with_contiguous(list(grads) + list(rings) + list(sums),
                     lambda w: _launch_triton(grokfast_ma_triton, [w[:n], w[n:2 * n], w[2 * n:]], [w[:n], w[n:2 * n]],
                                              slot, scale, lamb))


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

def _grokfast_ema_eager(grads: list[torch.Tensor], emas: list[torch.Tensor], alpha: float, lamb: float,
                        backend: str) -> None:
    _dispatch.resolve("grokfast_ema", grads[0].device, backend)(grads, emas, alpha, lamb)


def _grokfast_ma_eager(grads: list[torch.Tensor], rings: list[torch.Tensor], sums: list[torch.Tensor], step: int,
                       lamb: float, warmup: bool, backend: str) -> None:
    _dispatch.resolve("grokfast_ma", grads[0].device, backend)(grads, rings, sums, step, lamb, warmup)


_grokfast_ema_op = torch.library.custom_op("forge::grokfast_ema_", _grokfast_ema_eager, mutates_args=("grads", "emas"))
_grokfast_ma_op = torch.library.custom_op("forge::grokfast_ma_", _grokfast_ma_eager,
                                          mutates_args=("grads", "rings", "sums"))


def grokfast_ema_(grads, emas, alpha: float = 0.98, lamb: float = 2.0, backend: str = "auto") -> None:
    """In place, for each pair: ema <- alpha*ema + (1-alpha)*g, then g <- g + lamb*ema.

    Args:
        grads: gradients (float32, bfloat16 or float16), any shapes, one device.
        emas: state tensors of the same shapes (float32 recommended, or 16-bit).
        alpha: EMA momentum in [0, 1). lamb: amplification of the slow component.
        backend: "auto", "torch", "cpu", "triton" or "cuda". One pass over all tensors.
    Non-finite gradients propagate into the output and the state, as in torch.optim.
    """
    grads, emas = check_tensor_list("grads", grads), check_tensor_list("emas", emas)
    check_paired_lists("grads", grads, "emas", emas)
    alpha = check_finite_number("alpha", alpha, low=0.0, high=1.0, high_open=True)
    lamb = check_finite_number("lamb", lamb)
    _dispatch.call_op(_grokfast_ema_op, _grokfast_ema_eager, grads, emas, alpha, lamb, backend)


def grokfast_ma_(grads, rings, sums, step: int, lamb: float = 5.0, warmup: bool = True,
                 backend: str = "auto") -> None:
    """In place: g <- g + lamb * mean of the last `window` gradients (this one included).

    Args:
        grads: gradients. rings: buffers of shape (window, *g.shape) (see `grokfast_ma_init`).
        sums: float32 running sums of the ring contents, g's shape.
        step: how many gradients the rings already hold (0 on the first call); the caller counts.
        warmup: leave g unchanged until the window is full (the paper's default).
    """
    grads, rings, sums = (check_tensor_list(n, t) for n, t in (("grads", grads), ("rings", rings), ("sums", sums)))
    check_paired_lists("grads", grads, "sums", sums, state_dtypes=(torch.float32,))
    for i, (g, r) in enumerate(zip(grads, rings)):
        check_float_tensor(f"rings[{i}]", r)
        if r.dim() != g.dim() + 1 or r.shape[1:] != g.shape or r.device != g.device:
            raise ValueError(f"rings[{i}] must have shape (window, *grads[{i}].shape) on {g.device}; got {tuple(r.shape)} on {r.device}")
    windows = {r.shape[0] for r in rings}
    if len(windows) != 1 or 0 in windows:
        raise ValueError(f"rings must share one window size >= 1; got {sorted(windows)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r}; expected an integer >= 0")
    lamb = check_finite_number("lamb", lamb)
    _dispatch.call_op(_grokfast_ma_op, _grokfast_ma_eager, grads, rings, sums, step, lamb, bool(warmup), backend)
