"""forge.kernels: the Triton kernels (installed from the top-level kernels/ folder).

Set TRITON_INTERPRET=1 before importing this package to run them on the CPU: Triton reads the
variable when a kernel is defined.
"""
import os


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
