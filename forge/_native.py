"""Loading forge's compiled modules: `forge._C` (C++ CPU kernels) and `forge._cuda` (CUDA kernels).

Native code never breaks import. A module that is missing or fails to load logs one warning and
its backend is simply absent from the dispatch table; `load_errors()` says why.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

log = logging.getLogger("forge")

# Dtype codes shared with csrc/cpu/common.h and csrc/cuda/grokfast.cu.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def _load(name: str, needs_gpu: bool) -> ModuleType | None:
    if name in _modules:
        return _modules[name]
    module = None
    if needs_gpu and not torch.cuda.is_available():
        _errors[name] = "torch sees no CUDA device"
    else:
        try:
            module = importlib.import_module(f"forge.{name}")
        except ImportError as err:  # a wheel built without it, or a broken build
            _errors[name] = f"{type(err).__name__}: {err}"
            log.warning("forge.%s could not be loaded (%s); its backend is disabled", name, err)
    _modules[name] = module
    return module


def cpu_module() -> ModuleType | None:
    """forge._C, or None when it is not built."""
    return _load("_C", needs_gpu=False)


def cuda_module() -> ModuleType | None:
    """forge._cuda, or None without a GPU or without a CUDA build."""
    return _load("_cuda", needs_gpu=True)


def load_errors() -> dict[str, str]:
    """Why each native module that is absent did not load."""
    cpu_module()
    cuda_module()
    return dict(_errors)


def dtype_code(tensor: torch.Tensor) -> int:
    return DTYPE_CODES[tensor.dtype]
