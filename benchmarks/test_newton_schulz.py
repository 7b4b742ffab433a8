"""Newton-Schulz against its reference and peers (torch.optim.Muon's), same inputs, same run."""
import pytest
import torch

from conftest import DEVICE, QUICK, run_benchmark
from forge.bench import default_cases

CASES = default_cases(DEVICE, quick=QUICK, only=["newton_schulz"])
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_newton_schulz(benchmark, record, case, impl):
    benchmark.group = f"newton_schulz {case.name}"
    out = run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=5)
    record(case, impl, benchmark)
    quality = case.quality(out)
    benchmark.extra_info.update(quality)
    limit = 5e-2 if out.dtype != torch.float32 or impl == "torch.optim.Muon" else 1e-3
    assert quality["rel_err_vs_fp64"] < limit
