"""Input checks shared by the ops: every error names the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch

from forge._checks import check_finite_number, check_positive_int

__all__ = ["FLOAT_DTYPES", "check_finite_number", "check_positive_int", "check_float_tensor", "check_tensor_list",
           "check_paired_lists"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")


def check_tensor_list(name: str, tensors) -> list[torch.Tensor]:
    if type(tensors) is list and tensors:  # the common case, without the ABC check below (~3 us a call)
        return tensors
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty; expected at least one tensor")
    return list(tensors)


def check_paired_lists(first: str, a: list, second: str, b: list, state_dtypes=FLOAT_DTYPES) -> None:
    """Two lists of tensors that must match one to one in length, shape and device."""
    if len(a) != len(b):
        raise ValueError(f"{first} and {second} differ in length: {len(a)} vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        check_float_tensor(f"{first}[{i}]", x)
        check_float_tensor(f"{second}[{i}]", y, state_dtypes)
        if x.shape != y.shape:
            raise ValueError(f"{first}[{i}] has shape {tuple(x.shape)} but {second}[{i}] has {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"{first}[{i}] is on {x.device} but {second}[{i}] is on {y.device}")
    devices = {x.device for x in a}
    if len(devices) > 1:
        raise ValueError(f"{first} spans several devices {sorted(map(str, devices))}; expected one")
