"""Where and in what precision the phases train (hardware.device, hardware.precision).

Every phase runs on `PhaseContext.device`: the orchestrator moves each input model there before the phase starts,
a phase builds its new models there, and checkpoints are written from CPU copies (forge.registry.save_checkpoint).
`forge.pipeline.training.optimize`, the loop every trainer shares, runs each training forward under
`training_autocast`: bf16 autocast when hardware.precision resolves to "bfloat16" (its "auto" does on CUDA), float32
otherwise. Backward runs outside autocast, as torch recommends, and evaluations stay float32.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn

_precision: ContextVar[str] = ContextVar("forge_training_precision", default="float32")


def resolve_precision(choice: str, device: torch.device | str) -> str:
    """hardware.precision for `device`: "auto" is bfloat16 on CUDA (bf16 products are fast there and every public
    Muon trains so) and float32 elsewhere; "float32" and "bfloat16" stand."""
    if choice not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {choice!r}")
    if choice == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return choice


@contextmanager
def training_precision(choice: str, device: torch.device | str):
    """Within the block, `training_autocast` follows `choice` resolved for `device` (the orchestrator opens it
    around each phase)."""
    token = _precision.set(resolve_precision(choice, device))
    try:
        yield
    finally:
        _precision.reset(token)


def current_precision() -> str:
    return _precision.get()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without either)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def training_autocast(model: nn.Module):
    """bf16 autocast on the model's device when the training precision is bfloat16, else nothing."""
    if _precision.get() != "bfloat16":
        return nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)
