"""Rebuild a model from its checkpoint metadata: the one place the pipeline turns metadata into a module."""
from __future__ import annotations

from torch import nn


def build_from_metadata(metadata: dict) -> nn.Module:
    """A fresh (untrained) model of the architecture in metadata["model_config"], via
    forge.nn.build_model; load the checkpoint's state_dict into it afterwards."""
    from forge.nn import build_model

    if not isinstance(metadata, dict) or not isinstance(metadata.get("model_config"), dict):
        raise ValueError("checkpoint metadata must hold 'model_config' (TransformerConfig.to_dict()); "
                         f"got keys {sorted(metadata) if isinstance(metadata, dict) else type(metadata).__name__}")
    return build_model(metadata["model_config"])
