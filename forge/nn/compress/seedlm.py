"""SeedLM weight codec (Shafipour et al. 2024, arXiv 2410.10714) over the forge.ops kernels: a weight tensor is
flattened row-major, zero-padded to a multiple of C, cut into blocks, and each block stored as a K-bit seed, P
4-bit mantissas and one 4-bit exponent: (K + 4 + 4P) / C bits a weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.ops import seedlm_decode, seedlm_linear, seedlm_search
from forge.ops.seedlm import blocks_to_weight, weight_to_blocks


@dataclass
class SeedLMCodes:
    seeds: torch.Tensor        # int32 (n_blocks,)
    q: torch.Tensor            # int8 (n_blocks, P)
    e: torch.Tensor            # int8 (n_blocks,)
    shape: tuple[int, ...]
    K: int
    C: int

    @property
    def P(self) -> int:
        return self.q.shape[1]

    def decode(self, backend: str = "auto") -> torch.Tensor:
        return blocks_to_weight(seedlm_decode(self.seeds, self.q, self.e, self.K, self.C, backend=backend), self.shape)

    def linear(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return seedlm_linear(x, self.seeds, self.q, self.e, self.shape[0], self.K, self.C, backend=backend)


def seedlm_encode(weight: torch.Tensor, C: int = 8, P: int = 3, K: int = 16, num_seeds: int | None = None,
                  backend: str = "auto") -> SeedLMCodes:
    """SeedLM codes of `weight` (any shape; a linear layer's (out, in) weight decodes through seedlm_linear)."""
    seeds, q, e, _ = seedlm_search(weight_to_blocks(weight, C), K, P, num_seeds, backend=backend)
    return SeedLMCodes(seeds, q, e, tuple(weight.shape), K, C)
