"""SeedLM: the fused seed search against the plain-PyTorch search (precomputed pseudo-inverses, batched
matmuls), decode, and seedlm_linear at batch 1 and 8 against decode-then-F.linear and a dense F.linear.

The search case is exhaustive over all 2^16 - 1 seeds for the cpu kernel; the torch reference runs the same
blocks over the same seeds. `python benchmarks/test_seedlm.py` prints the cases timed interleaved, and the
milliseconds per block of the exhaustive search (the replication reports 3-5 ms a block on 2 cores).
"""
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, QUICK, run_benchmark

from forge.bench import Case, format_rows, run_case
from forge.ops import available_backends, seedlm_decode, seedlm_linear, seedlm_search
from forge.ops import seedlm as S
from forge.ops._dispatch import runs_on

K, C, P = 16, 8, 3


def fast_backends(op: str, device: torch.device) -> list[str]:
    return [b for b in available_backends(op) if b != "torch" and runs_on(b, device)
            and (b != "triton" or device.type == "cuda")]


def search_case(n_blocks: int, num_seeds: int | None) -> Case:
    blocks = torch.randn(n_blocks, C)
    S._search_tables(K, C, P, num_seeds or (1 << K) - 1)  # the reference's tables are built once, not timed
    impls = {"torch reference": lambda: seedlm_search(blocks, K, P, num_seeds, backend="torch")}
    for b in fast_backends("seedlm_search", torch.device("cpu")):
        impls[f"forge.{b}"] = lambda b=b: seedlm_search(blocks, K, P, num_seeds, backend=b)
    seeds = num_seeds or (1 << K) - 1
    return Case("seedlm_search", f"{n_blocks}blk-{seeds}seeds", impls, "torch reference",
                info={"blocks": n_blocks, "seeds": seeds})


def linear_case(n: int, batch: int) -> Case:
    w = torch.randn(n, n) * 0.02
    seeds, q, e, _ = seedlm_search(S.weight_to_blocks(w, C), K, P, num_seeds=64)  # the codes, not their quality
    x = torch.randn(batch, n)
    w_hat = S.blocks_to_weight(seedlm_decode(seeds, q, e, K, C), (n, n))
    impls = {"decode + F.linear": lambda: F.linear(x, S.blocks_to_weight(seedlm_decode(seeds, q, e, K, C,
                                                                                       backend="torch"), (n, n))),
             "dense F.linear fp32": lambda: F.linear(x, w_hat)}
    for b in fast_backends("seedlm_linear", torch.device("cpu")):
        impls[f"forge.{b}"] = lambda b=b: seedlm_linear(x, seeds, q, e, n, K, C, backend=b)
    info = {"dense_weight_bytes": n * n * 4, "code_bytes": seeds.numel() * (K + 4 + 4 * P) // 8}
    return Case("seedlm_linear", f"{n}x{n}-batch{batch}", impls, "decode + F.linear", info=info)


def seedlm_cases(quick: bool) -> list[Case]:
    n_blocks = 256 if quick else 1024
    n = 512 if quick else 2048
    return [search_case(n_blocks, 4096), search_case(n_blocks // 4, None), linear_case(n, 1), linear_case(n, 8)]


CASES = seedlm_cases(QUICK) if DEVICE.type == "cpu" else []
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_seedlm(benchmark, record, case, impl):
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case.info)
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=3 if case.op == "seedlm_search" else 20)
    record(case, impl, benchmark)


def ms_per_block(n_blocks: int = 2048, repeats: int = 5) -> float:
    """Median wall milliseconds per block of the exhaustive (65535-seed) cpu search."""
    blocks = torch.randn(n_blocks, C)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        seedlm_search(blocks, K, P, backend="cpu")
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3 / n_blocks


if __name__ == "__main__":
    rows = []
    for case in CASES:
        rows += run_case(case, DEVICE, rounds=3 if case.op == "seedlm_search" else 30)
        print(format_rows(rows[-len(case.impls):]), case.info, flush=True)
    print(f"exhaustive cpu search: {ms_per_block():.4f} ms per block ({torch.get_num_threads()} threads)")
