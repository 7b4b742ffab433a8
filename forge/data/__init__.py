"""forge.data: small synthetic data sets for tests and benchmarks."""
from forge.data.modular import modular_arithmetic_split

__all__ = ["modular_arithmetic_split"]
