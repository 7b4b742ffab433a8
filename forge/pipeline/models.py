"""Rebuild a model from its checkpoint metadata: the one place the pipeline turns metadata into a module."""
from __future__ import annotations

from torch import nn


def build_from_metadata(metadata: dict, state_dict: dict | None = None) -> nn.Module:
    """A fresh (untrained) model of the architecture in metadata["model_config"], via
    forge.nn.build_model; load the checkpoint's state_dict into it afterwards. A compressed checkpoint (Phase 8's:
    its state_dict holds a codec table) gets CodedLinear layers decoded from `state_dict`'s bytes."""
    from forge.nn import build_model

    if not isinstance(metadata, dict) or not isinstance(metadata.get("model_config"), dict):
        raise ValueError("checkpoint metadata must hold 'model_config' (TransformerConfig.to_dict()); "
                         f"got keys {sorted(metadata) if isinstance(metadata, dict) else type(metadata).__name__}")
    model = build_model(metadata["model_config"])
    if state_dict is not None:
        from forge.nn.compress.coded import coded_model_from_state, is_coded_state

        if is_coded_state(state_dict):
            return coded_model_from_state(model, state_dict)
    return model


def parameter_count(model: nn.Module) -> int:
    """The model's parameters: its float tensors plus the weights its CodedLinear layers encode (Phase 8)."""
    from forge.nn.compress.coded import coded_layers

    coded = sum(m.in_features * m.out_features for m in coded_layers(model).values())
    return sum(p.numel() for p in model.parameters()) + coded
