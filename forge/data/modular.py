"""Modular arithmetic, the grokking task (Power et al. 2022, arXiv 2201.02177) used by Grokfast
(Lee et al. 2024, arXiv 2405.20233): sequences [x, op, y, =], answer (x op y) mod p.

Tokens 0..p-1 are the numbers, p is the operator and p + 1 is '=', so the vocabulary has p + 2
entries. As in the Grokfast code, "mul" takes y in 1..p-1 (x * 0 is trivial) and "add" y in 0..p-1.
"""
from __future__ import annotations

import torch

from forge._checks import check_finite_number

OPS = ("mul", "add")


def modular_arithmetic_split(p: int = 97, op: str = "mul", train_fraction: float = 0.5, seed: int = 0):
    """(train_x, train_y, val_x, val_y), int64: inputs (n, 4) = [x, p, y, p + 1], targets (n,) = (x op y) mod p.

    All pairs are enumerated, shuffled by a generator seeded with `seed` (same seed, same split),
    and the first `train_fraction` of them (rounded down, at least one) go to training.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ValueError(f"Invalid p: {p!r}; expected an integer >= 2")
    if op not in OPS:
        raise ValueError(f"Invalid op: {op!r}; expected one of {OPS}")
    check_finite_number("train_fraction", train_fraction, 0.0, 1.0, low_open=True, high_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
    x, y = torch.meshgrid(torch.arange(p), torch.arange(1 if op == "mul" else 0, p), indexing="ij")
    x, y = x.flatten(), y.flatten()
    target = (x * y) % p if op == "mul" else (x + y) % p
    inputs = torch.stack([x, torch.full_like(x, p), y, torch.full_like(x, p + 1)], dim=1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = min(max(int(train_fraction * len(x)), 1), len(x) - 1)
    train, val = order[:cut], order[cut:]
    return inputs[train], target[train], inputs[val], target[val]
