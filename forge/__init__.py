"""forge: compiled kernels for training small agent models, and the Agent Forge pipeline."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`forge.load_model` (forge.pipeline.loading), imported on first use so `import forge` stays light."""
    if name == "load_model":
        from forge.pipeline.loading import load_model

        return load_model
    raise AttributeError(f"module 'forge' has no attribute {name!r}")
