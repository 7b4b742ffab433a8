"""KL regularization towards a frozen reference model (the presets' kl_coefficient)."""
from __future__ import annotations

import torch
from torch import nn

from forge.ops.kl_div import kl_div_logits, kl_div_logits_reference

__all__ = ["KLRegularizer", "kl_div_logits_reference"]


class KLRegularizer:
    """coefficient * KL(reference || model): keeps a model near a frozen reference while it trains.

        reg = KLRegularizer(reference_model, coefficient=0.1)
        loss = task_loss + reg(inputs, model_logits)

    The reference runs under no_grad in eval mode and is never changed; `coefficient=0` costs nothing.
    """

    def __init__(self, reference_model: nn.Module, coefficient: float, temperature: float = 1.0):
        if not isinstance(coefficient, (int, float)) or coefficient < 0:
            raise ValueError(f"Invalid coefficient: {coefficient!r}; expected a number >= 0")
        if temperature <= 0:
            raise ValueError(f"Invalid temperature: {temperature!r}; expected > 0")
        self.reference_model = reference_model
        self.coefficient = float(coefficient)
        self.temperature = float(temperature)

    def __call__(self, inputs, model_logits: torch.Tensor) -> torch.Tensor:
        if self.coefficient == 0.0:
            return model_logits.new_zeros(())
        was_training = self.reference_model.training
        self.reference_model.eval()
        try:
            with torch.no_grad():
                reference_logits = self.reference_model(inputs)
        finally:
            self.reference_model.train(was_training)
        if reference_logits.shape != model_logits.shape:
            raise ValueError(f"reference logits {tuple(reference_logits.shape)} and model logits "
                             f"{tuple(model_logits.shape)} differ in shape")
        return self.coefficient * kl_div_logits(model_logits, reference_logits, temperature=self.temperature)
