"""Tile-size sweep for the Triton symmetric product at the shapes Newton-Schulz meets (GPU only).

Prints the median time of C = X X^T (and the fused b A + c A A^T) per config, and cuBLAS's dense
product for scale, so the default in kernels/newton_schulz.py can name the sweep that chose it.
"""
import statistics
import sys

import torch

from forge.bench import time_interleaved
from forge.kernels.newton_schulz import sym_mm_triton

CONFIGS = [
    dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=256, BLOCK_K=64, num_warps=8, num_stages=3),
]


def main() -> int:
    device = torch.device("cuda")
    for b, m, k in [(1, 4096, 4096), (1, 2048, 8192), (1, 1024, 4096), (24, 768, 3072), (24, 768, 768)]:
        X = torch.randn(b, m, k, device=device, dtype=torch.bfloat16)
        impls = {"cublas dense X X^T": lambda: torch.bmm(X, X.mT), "forge default": lambda: sym_mm_triton(X, X)}
        for cfg in CONFIGS:
            impls[str(tuple(cfg.values()))] = lambda cfg=cfg: sym_mm_triton(X, X, config=cfg)
        try:
            samples = time_interleaved(impls, device, rounds=20, warmup=2)
        except Exception as err:  # a config that does not fit shared memory
            print(f"{b}x{m}x{k}: sweep failed: {err}")
            continue
        flops = 2 * b * m * m * k
        for label, v in samples.items():
            ms = statistics.median(v) * 1e3
            print(f"{b}x{m}x{k} {label:<32} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} dense-equivalent TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
