"""KL losses towards a teacher: the prompt baker's objective and the KL regularizer of the phase presets.

Both are KL(teacher || student) per row of logits over the vocabulary (batchmean over the rows), computed
by the fused `forge.ops.kl_div_logits` (see there for the math, the temperature and the mask).
"""
from __future__ import annotations

import torch
from torch import nn

from forge.ops import kl_div_logits

__all__ = ["KLRegularizer", "kl_to_teacher"]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student), batchmean over the rows that `mask` keeps (all without one), in the
    student's dtype; the teacher's logits are cast to the student's dtype first and get no gradient."""
    return kl_div_logits(student_logits, teacher_logits.to(student_logits.dtype), temperature=temperature, mask=mask)


class KLRegularizer:
    """coefficient * KL(reference || model): keeps a model near a frozen reference while it trains.

        reg = KLRegularizer(reference_model, coefficient=0.1)
        loss = task_loss + reg(inputs, model_logits)

    The reference runs under no_grad in eval mode and is never changed; `coefficient=0` costs nothing.
    The phase presets give the coefficient: `forge.optim.MuGrokConfig.from_phase(phase).kl_coefficient`.
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
        return self.coefficient * kl_to_teacher(model_logits, reference_logits, temperature=self.temperature)
