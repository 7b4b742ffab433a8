"""SeedLM: the fused seed search against the plain-PyTorch search (precomputed pseudo-inverses, batched
matmuls), and seedlm_linear at batch 1 and 8 against decode-then-F.linear and a dense F.linear.

The cases are forge.bench's (`forge bench --only seedlm`), on the CPU or a GPU (FORGE_BENCH_DEVICE); the
full-size search cases include one exhaustive over all 2^16 - 1 seeds. `python benchmarks/test_seedlm.py`
prints the cases timed interleaved, and on the CPU the milliseconds per block of the exhaustive search (the
replication reports 3-5 ms a block on 2 cores).
"""
import time

import pytest
import torch
from conftest import DEVICE, QUICK, run_benchmark

from forge.bench import default_cases, format_rows, run_case
from forge.ops import seedlm_search

CASES = default_cases(DEVICE, quick=QUICK, only=["seedlm"])
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_seedlm(benchmark, record, case, impl):
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case.info)
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=3 if case.op == "seedlm_search" else 20)
    record(case, impl, benchmark)


def ms_per_block(n_blocks: int = 2048, repeats: int = 5) -> float:
    """Median wall milliseconds per block of the exhaustive (65535-seed) cpu search."""
    blocks = torch.randn(n_blocks, 8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        seedlm_search(blocks, K=16, P=3, backend="cpu")
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3 / n_blocks


if __name__ == "__main__":
    rows = []
    for case in CASES:
        rows += run_case(case, DEVICE, rounds=3 if case.op == "seedlm_search" else 30)
        print(format_rows(rows[-len(case.impls):]), case.info, flush=True)
    if DEVICE.type == "cpu":
        print(f"exhaustive cpu search: {ms_per_block():.4f} ms per block ({torch.get_num_threads()} threads)")
