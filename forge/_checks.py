"""Number checks that need no torch (the registry and the CLI's light commands use them without loading
torch); forge.ops._validate re-exports them beside its tensor checks. Errors name the argument."""
from __future__ import annotations

import math


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
