"""Grokfast EMA over a 12-layer, 768-wide transformer's parameters (85M values) against the
published per-tensor form and torch's foreach form, with copy / in-place bandwidth probes."""
import pytest

from conftest import DEVICE, QUICK, run_benchmark
from forge.bench import default_cases

CASES = default_cases(DEVICE, quick=QUICK, only=["grokfast_ema"])
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_grokfast_ema(benchmark, record, case, impl):
    benchmark.group = f"grokfast_ema {case.name}"
    benchmark.extra_info.update(case.info, bytes_per_call=case.bytes_moved)
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=9)
    record(case, impl, benchmark)
