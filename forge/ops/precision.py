"""Whether bfloat16 matrix products are fast here: what `ns_dtype="auto"` (forge.optim.MuonGrokfast) decides by.

Newton-Schulz is an approximate orthogonalization by design (five quintic steps leave singular values in about
[0.7, 1.1]), and every public Muon runs it in bf16 on GPUs, so its precision is a speed choice. bf16 GEMMs are
fast on CUDA and on CPUs with native bf16 dot products (AVX-512 BF16, AMX); on a CPU without them (AVX2 only)
torch emulates bf16 GEMMs about 50x slower than fp32 (benchmarks/RESULTS.md, "CPU without bf16"). The CPU
answer comes from a one-time probe per process: a 384x384 product timed in both dtypes, best of a few calls.
`FORGE_CPU_BF16=1` / `=0` sets the answer without probing (a test that must see one path, a machine where the
probe is fooled by load). `forge backends` prints it with the CPU's bf16 flags.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

PROBE_SIZE = 384
ENV = "FORGE_CPU_BF16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def vector_flags() -> list[str]:
    """The flags that decide the kernels' speed: AVX2/FMA, AVX-512, and native bf16/fp16 (AVX-512, AMX)."""
    flags = cpu_flags()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]


def cpu_model() -> str:
    """The CPU's model name as Linux lists it, else the platform's machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _best_ms(a: torch.Tensor, calls: int = 5) -> float:
    torch.mm(a, a)   # warm-up: the first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(calls):
        started = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


@functools.cache
def cpu_bf16_probe() -> dict:
    """{"fast": bool, "fp32_ms", "bf16_ms", "source"}: whether bf16 products beat fp32 ones on this CPU."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return {"fast": forced == "1", "fp32_ms": None, "bf16_ms": None, "source": f"{ENV}={forced}"}
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = _best_ms(a), _best_ms(a.bfloat16())
    return {"fast": bf16 < fp32, "fp32_ms": fp32, "bf16_ms": bf16, "source": "probe"}


def fast_bf16(device: torch.device) -> bool:
    """bf16 matrix products are at least as fast as fp32 ones on `device` (CUDA: yes; CPU: the probe)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return cpu_bf16_probe()["fast"]
    return False


def auto_ns_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype of `ns_dtype="auto"`: bfloat16 where its products are fast, else float32."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def describe_cpu() -> str:
    """One line: the CPU model, its vector and bf16 flags, and the bf16 probe's verdict."""
    shown, probe = vector_flags(), cpu_bf16_probe()
    timing = (f"{PROBE_SIZE}^2 product fp32 {probe['fp32_ms']:.2f} ms, bf16 {probe['bf16_ms']:.2f} ms"
              if probe["source"] == "probe" else probe["source"])
    verdict = "fast" if probe["fast"] else "slow"
    return (f"{cpu_model()}; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}; bf16 matmul {verdict} "
            f"({timing}): ns_dtype='auto' runs Newton-Schulz in {'bf16' if probe['fast'] else 'fp32'} on the CPU")
