"""SeedLM on Gaussian weights: relative Frobenius error by seeds searched, for (C, P, K) = (8, 3, 16) (4 bits a
weight) and (12, 4, 16) (3 bits), with the wall time of each search. The replication (qiuyu-ren/seedlm-repro)
reports 0.785 / 0.303 / 0.188 / 0.123 for 1 / 256 / 4096 / 65535 seeds at 4 bits, and 0.226 at 3 bits.
`python benchmarks/seedlm_error_curve.py`"""
import time

import torch

from forge.ops import seedlm as S
from forge.ops import seedlm_decode, seedlm_search


def main():
    torch.manual_seed(1)
    w = torch.randn(256, 64)                                   # 16384 weights
    print("| (C, P, K) | seeds | rel. error | search s | us/block |\n|---|---|---|---|---|")
    for C, P in ((8, 3), (12, 4)):
        blocks = S.weight_to_blocks(w, C)
        for num_seeds in (1, 256, 4096, None):
            start = time.perf_counter()
            seeds, q, e, _ = seedlm_search(blocks, K=16, P=P, num_seeds=num_seeds)
            dt = time.perf_counter() - start
            w_hat = S.blocks_to_weight(seedlm_decode(seeds, q, e, 16, C), w.shape)
            rel = ((w.double() - w_hat.double()).norm() / w.double().norm()).item()
            print(f"| ({C}, {P}, 16) | {num_seeds or 65535} | {rel:.4f} | {dt:.3f} | {dt / len(blocks) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
