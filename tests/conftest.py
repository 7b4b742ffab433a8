"""Shared test setup.

TRITON_INTERPRET must be set before anything imports forge.kernels (Triton reads it when a kernel is
defined), so the Triton backend runs on the CPU here. On a GPU machine, set FORGE_TEST_GPU=1 to keep
Triton compiled for the GPU instead.
"""
import os
import sys

# `python -m pytest` puts the repo root on sys.path, where the Triton source folder `kernels/` (installed as
# forge.kernels) would shadow the PyPI package `kernels` that transformers (under peft) imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

if not os.environ.get("FORGE_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ns_dtype="auto" (MuonGrokfast's default) picks bf16 Newton-Schulz on CPUs with fast bf16 products: tests compare
# against float32/float64 references on every CPU alike, so the suite (and the processes it starts) take the fp32
# answer; tests/ops/test_precision.py exercises both answers and the real probe.
os.environ.setdefault("FORGE_CPU_BF16", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import forge.ops  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def cpu_backends(op: str) -> list:
    """Backends that can run `op` on CPU tensors here, as pytest params (absent ones skip with the reason)."""
    usable = forge.ops.available_backends(op)
    params = []
    for name in ("torch", "cpu", "triton"):
        reason = f"{op}: backend {name!r} not available here"
        if name == "triton" and not os.environ.get("TRITON_INTERPRET"):
            usable, reason = [n for n in usable if n != "triton"], "Triton is compiled for the GPU (FORGE_TEST_GPU)"
        marks = [] if name in usable else [pytest.mark.skip(reason=reason)]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def gpu_backends(op: str) -> list:
    usable = forge.ops.available_backends(op) if torch.cuda.is_available() else []
    params = []
    for name in ("torch", "triton", "cuda"):
        reason = "no CUDA device" if not torch.cuda.is_available() else f"{op}: backend {name!r} not available"
        marks = [pytest.mark.gpu] + ([] if name in usable else [pytest.mark.skip(reason=reason)])
        params.append(pytest.param(name, marks=marks, id=f"gpu-{name}"))
    return params


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()
