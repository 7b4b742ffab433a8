"""forge: compiled kernels for training small agent models, and the Agent Forge pipeline."""

__version__ = "0.1.0"
