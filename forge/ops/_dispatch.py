"""The one backend table: `{op: {backend: implementation}}`, availability, and the choice rule.

Backends:
- `torch`  the plain-PyTorch reference; always there, on every device.
- `cpu`    C++ kernels in `forge._C` (or, for Newton-Schulz, fewer-FLOPs methods around torch's BLAS).
- `triton` Triton kernels in `forge.kernels`; on CUDA devices, or on the CPU under `TRITON_INTERPRET=1`.
- `cuda`   CUDA kernels in `forge._cuda`; only when torch sees a GPU.

`auto` takes the first available backend in the device's preference order; `FORGE_BACKEND`
replaces `auto`. A backend asked for by name that cannot run raises `BackendUnavailableError`
naming the ones that can. The choice is made at every call, never by swapping modules at import.
`call_op` is the one place that tells eager calls from calls that torch.compile traces.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch.autograd import forward_ad

from forge import _native
from forge.kernels import interpreted as triton_interpreted  # the package's __init__ imports no Triton

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")

T = TypeVar("T")

# Fastest first, per device type. The interpreted Triton backend is never chosen on the CPU by `auto`.
PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailableError(ValueError):
    """A backend was asked for by name (argument or FORGE_BACKEND) and cannot run this call."""


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    needs_native: bool = True  # False: built from torch ops alone (e.g. Newton-Schulz on `cpu`)


_TABLE: dict[str, dict[str, Implementation]] = {}
_last: dict[str, str] = {}


def register(op: str, backend: str, needs_native: bool = True):
    """Decorator: `fn` implements `op` on `backend`."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKEND_NAMES}")

    def wrap(fn: Callable) -> Callable:
        _TABLE.setdefault(op, {})[backend] = Implementation(fn, needs_native)
        return fn

    return wrap


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Looked up once: `find_spec` searches sys.path, too slow for every dispatch."""
    return importlib.util.find_spec("triton") is not None


def _backend_reason(backend: str, impl: Implementation) -> str | None:
    """None if the backend can run in this process, else why not."""
    if backend == "torch" or (backend == "cpu" and not impl.needs_native):
        return None
    if backend == "cpu":
        return None if _native.cpu_module() is not None else f"forge._C not loaded ({_native.load_errors().get('_C')})"
    if backend == "cuda":
        return None if _native.cuda_module() is not None else f"forge._cuda not loaded ({_native.load_errors().get('_cuda')})"
    if not _triton_installed():
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpreted()):
        return "no CUDA device and TRITON_INTERPRET is not set"
    return None


def runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return device.type == backend


def implemented() -> dict[str, tuple[str, ...]]:
    """Backends each op has code for (whatever this machine can run)."""
    return {op: tuple(b for b in BACKEND_NAMES if b in impls) for op, impls in sorted(_TABLE.items())}


def available_backends(op: str | None = None):
    """Per op, the backends usable in this process: `{op: [backend, ...]}`, or one op's list."""
    table = {o: [b for b in impls if _backend_reason(b, _TABLE[o][b]) is None] for o, impls in implemented().items()}
    return table if op is None else table[op]


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of `op` in this process."""
    return _last.get(op)


def environ_get(name: str) -> str | None:
    """os.environ.get(name) as one dict lookup: the mapping's own get costs about 2 us for a missing variable (it
    raises and catches KeyError), which every op call would pay. Changes made through os.environ are seen."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(name)
    raw = data.get(_ENCODED.get(name) or _ENCODED.setdefault(name, os.environ.encodekey(name)))
    return None if raw is None else os.environ.decodevalue(raw)


_ENCODED: dict[str, Any] = {}
# (op, device type, backend, FORGE_BACKEND, TRITON_INTERPRET) -> (backend name, implementation): what can run does
# not change within a process (native modules load once), so a call after the first is one lookup.
_resolved: dict[tuple, tuple[str, Callable]] = {}


def resolve(op: str, device: torch.device, backend: str = "auto") -> Callable:
    """The implementation of `op` that runs tensors on `device` for the requested `backend`."""
    key = (op, device.type, backend, environ_get("FORGE_BACKEND"), environ_get("TRITON_INTERPRET"))
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(op, device, backend, key[3])
    _last[op] = hit[0]
    return hit[1]


def _resolve(op: str, device: torch.device, backend: str, env_backend: str | None) -> tuple[str, Callable]:
    impls = _TABLE[op]
    requested = backend
    if backend == "auto":
        requested = env_backend or "auto"
    if requested != "auto" and requested not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {requested!r}; expected 'auto' or one of {BACKEND_NAMES}")
    if requested == "auto":
        for name in PREFERENCE.get(device.type, ("torch",)):
            if name in impls and _backend_reason(name, impls[name]) is None:
                return name, impls[name].fn
        raise BackendUnavailableError(f"{op}: no backend can run on device {device}")
    usable = [b for b in impls if _backend_reason(b, impls[b]) is None and runs_on(b, device)]
    if requested not in impls:
        why = f"{op} has no {requested!r} backend"
    elif not runs_on(requested, device):
        why = f"backend {requested!r} does not run tensors on device {device.type!r}"
    else:
        why = _backend_reason(requested, impls[requested])
    if why is not None or requested not in usable:
        source = "FORGE_BACKEND" if backend == "auto" else "backend"
        raise BackendUnavailableError(f"{op}: {source}={requested!r} is not available ({why}); available here: {usable}")
    return requested, impls[requested].fn


def call_op(op: Callable[..., T], eager: Callable[..., T], *args: Any) -> T:
    """`op(*args)` while torch.compile traces the caller, else `eager(*args)`.

    `op` is the torch.library op (an opaque node with a fake implementation for the compiler), or a
    traceable torch function; `eager` runs the same implementation directly, without the custom-op
    wrapper's per-call overhead. Both take the same arguments and compute the same result.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return eager(*args)


def needs_autograd(tensor: torch.Tensor) -> bool:
    """Whether an eager op on `tensor` must run through its autograd.Function: the tensor needs a gradient with grad
    mode on, or a forward-mode AD level is open (a dual tensor has requires_grad False, and the Function is what
    refuses it). Otherwise the Function records nothing and only costs its per-call overhead (10-25 us)."""
    return (tensor.requires_grad and torch.is_grad_enabled()) or getattr(forward_ad, "_current_level", 0) >= 0


def backend_matrix_markdown() -> str:
    """The README's op x backend table, generated from this module's table."""
    ops = implemented()
    lines = ["| op | " + " | ".join(BACKEND_NAMES) + " |", "|---|" + "---|" * len(BACKEND_NAMES)]
    for op, names in ops.items():
        lines.append(f"| `{op}` | " + " | ".join("yes" if b in names else "-" for b in BACKEND_NAMES) + " |")
    return "\n".join(lines)
