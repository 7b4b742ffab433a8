"""VQ: vq_linear at batch 1 and 8 (v = 8, k = 256, a 16-entry residual codebook) against decode-then-F.linear
with the torch reference and a dense F.linear (forge.bench's cases, `forge bench --only vq`); vq_decode against
the reference. On the CPU or a GPU (FORGE_BENCH_DEVICE). `python benchmarks/test_vq.py` prints the same cases
timed interleaved."""
import pytest
from conftest import DEVICE, QUICK, run_benchmark

from forge.bench import (
    Case,
    default_cases,
    fast_backends,
    format_rows,
    run_case,
    vq_codes,
)
from forge.ops import vq_decode


def decode_case(n: int) -> Case:
    codes = vq_codes(n, DEVICE)
    impls = {"torch reference": lambda: vq_decode(out_features=n, backend="torch", **codes)}
    for b in fast_backends("vq_decode", DEVICE):
        impls[f"forge.{b}"] = lambda b=b: vq_decode(out_features=n, backend=b, **codes)
    return Case("vq_decode", f"{n}x{n}", impls, "torch reference")


CASES = [decode_case(512 if QUICK else 2048), *default_cases(DEVICE, quick=QUICK, only=["vq"])]
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_vq(benchmark, record, case, impl):
    benchmark.group = f"{case.op} {case.name}"
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=20)
    record(case, impl, benchmark)


if __name__ == "__main__":
    rows = []
    for case in CASES:
        rows += run_case(case, DEVICE, rounds=30)
        print(format_rows(rows[-len(case.impls):]), case.info, flush=True)
