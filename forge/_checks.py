"""Checks that need no torch (the registry and the CLI's light commands use them without loading torch):
numbers (forge.ops._validate re-exports those beside its tensor checks; errors name the argument) and
size-capped reads of the small files forge keeps beside its checkpoints (errors name the file and the cap)."""
from __future__ import annotations

import math
import os


def check_finite_number(name: str, value, low=-math.inf, high=math.inf, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: {value}; expected a finite value in {left}{low}, {high}{right}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")
    return value


def read_capped(path: str | os.PathLike, cap: int, what: str, error: type[Exception] = ValueError,
                advice: str = "forge never writes one this big, so it is damaged or not forge's: "
                              "restore or remove it") -> bytes:
    """The bytes of a small file, refused (error, naming the file and the cap) past `cap` bytes without
    reading more than cap + 1 of them, so a huge or endless file cannot exhaust memory."""
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise error(f"{path}: {what} is larger than the {cap:,}-byte cap; {advice}")
    return data
