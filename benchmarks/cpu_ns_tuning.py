"""The CPU measurements behind forge/ops/newton_schulz.py's constants, repeated on this machine:
DENSE_MAX_ROWS and the leaf size of sym_mm_blocked, GRAM_MIN_ASPECT, and bf16 against fp32 GEMMs.

    python benchmarks/cpu_ns_tuning.py
"""
import statistics

import torch

from forge.bench import time_interleaved
from forge.ops.newton_schulz import ns_fast, resolve_coefficients, sym_mm_blocked, sym_mm_dense

CPU = torch.device("cpu")


def medians(impls: dict, rounds: int = 7) -> str:
    samples = time_interleaved(impls, CPU, rounds)
    return "  ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in samples.items())


def main() -> None:
    print("X X^T, dense GEMM against the blocked lower half (leaf rows):")
    for m in (256, 384, 512, 768, 1024, 2048):
        X = torch.randn(1, m, m)
        impls = {"dense": lambda X=X: sym_mm_dense(X, X)}
        impls.update({f"leaf {leaf}": lambda X=X, leaf=leaf: sym_mm_blocked(X, X, leaf=leaf, dense_max_rows=0)
                      for leaf in (128, 256, 512) if leaf < m})
        print(f"  m={m}: {medians(impls)}")
    print("Newton-Schulz (muon, 5 steps), standard symmetric form against Gram, m = 512:")
    triples = resolve_coefficients("muon", 5)
    for aspect in (1.0, 1.25, 1.5, 2.0, 4.0):
        G = torch.randn(512, int(512 * aspect))
        impls = {method: lambda method=method, G=G: ns_fast(G, triples, 1e-7, sym_mm_blocked, torch.float32, False, method)
                 for method in ("symmetric", "gram")}
        print(f"  n/m={aspect}: {medians(impls, 5)}")
    A32 = torch.randn(1024, 1024)
    A16 = A32.bfloat16()
    print(f"1024^3 GEMM: {medians({'fp32': lambda: A32 @ A32, 'bf16': lambda: A16 @ A16})}")


if __name__ == "__main__":
    main()
