"""The original system's MuGrokConfig and its phase presets, so its users switch by changing an import.

The original system's `muon_lr` values (1e-4 to 1e-3) are AdamW-scale rates; the presets therefore use
Moonlight's `match_rms_adamw` scaling (0.2 * sqrt(max(rows, cols)), Liu et al. 2025), under which Muon's
update has AdamW's RMS and AdamW's learning rates carry over. `fallback_lr` is the AdamW groups' rate.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from forge.optim.muon_grokfast import MuonGrokfast
from forge.optim.param_groups import muon_param_groups
from forge.optim.qk_clip import qk_logit_recorders


@dataclass(frozen=True)
class MuGrokConfig:
    """Settings of MuonGrokfast under the original system's names (see `to_kwargs` for the mapping;
    `grokfast_lambda` here is MuonGrokfast's `grokfast_lamb`). `kl_coefficient` is not an optimizer
    setting: it is the weight of a KL term to a frozen reference model (a KLRegularizer's coefficient)
    that the phase's training loss adds; read it from the config: `MuGrokConfig.from_phase(3).kl_coefficient`."""

    muon_lr: float
    fallback_lr: float = 1e-3
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 2.0
    qk_clip_threshold: float | None = 30.0
    kl_coefficient: float = 0.0
    muon_ste_mode: bool = False
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    weight_decay: float = 0.0

    @classmethod
    def from_phase(cls, phase: int) -> "MuGrokConfig":
        """The original system's preset for pipeline phase 1, 3, 5, 6 or 7 (other phases have none)."""
        if phase not in PHASE_PRESETS:
            raise ValueError(f"Invalid phase: {phase!r}; presets exist for phases {sorted(PHASE_PRESETS)}")
        return PHASE_PRESETS[phase]

    @classmethod
    def custom(cls, muon_lr: float = 0.01, **changes) -> "MuGrokConfig":
        return cls(muon_lr=muon_lr, **changes)

    @classmethod
    def phase_defaults(cls, phase: int) -> dict:
        """Phase `phase`'s preset as one flat dict: its MuonGrokfast keyword arguments (`to_kwargs`)
        plus `kl_coefficient`."""
        config = cls.from_phase(phase)
        return dict(config.to_kwargs(), kl_coefficient=config.kl_coefficient)

    def to_kwargs(self) -> dict:
        """MuonGrokfast keyword arguments for this config: lr, adamw_lr, grokfast_alpha, grokfast_lamb,
        qk_clip_threshold, ste_mode, momentum, nesterov, ns_steps, weight_decay, adjust_lr_fn."""
        return dict(lr=self.muon_lr, adamw_lr=self.fallback_lr, grokfast_alpha=self.grokfast_alpha,
                    grokfast_lamb=self.grokfast_lambda, qk_clip_threshold=self.qk_clip_threshold,
                    ste_mode=self.muon_ste_mode, momentum=self.momentum, nesterov=self.nesterov,
                    ns_steps=self.ns_steps, weight_decay=self.weight_decay, adjust_lr_fn="match_rms_adamw")


# The original system's per-phase values (the phase table of its MuGrok optimizer description). Its
# phase-5 STE flag is a leftover of an older layout (quantization moved to phase 4) and is kept as it was.
PHASE_PRESETS = {
    1: MuGrokConfig(muon_lr=1e-3, fallback_lr=1e-3, grokfast_lambda=0.3, qk_clip_threshold=30.0),  # Cognate
    3: MuGrokConfig(muon_lr=5e-4, fallback_lr=5e-4, grokfast_lambda=0.1, qk_clip_threshold=25.0,
                    kl_coefficient=0.1),  # Quiet-STaR: RL, tighter clip, KL to the baked model
    5: MuGrokConfig(muon_lr=1e-3, fallback_lr=1e-3, grokfast_lambda=2.0, qk_clip_threshold=30.0,
                    muon_ste_mode=True),  # Curriculum
    6: MuGrokConfig(muon_lr=1e-4, fallback_lr=1e-4, grokfast_lambda=0.2, qk_clip_threshold=30.0),  # Baking
    7: MuGrokConfig(muon_lr=5e-4, fallback_lr=5e-4, grokfast_lambda=0.15, qk_clip_threshold=28.0,
                    kl_coefficient=0.05),  # Experts (SVF)
}


def create_optimizer_from_phase(model: nn.Module, phase: int, **overrides) -> MuonGrokfast:
    """MuonGrokfast for `model` with phase `phase`'s preset (`overrides`: MuonGrokfast keyword arguments
    that replace the preset's): groups from `muon_param_groups`, QK-clip on every module of the model
    that records its attention logits (`register_qk_clip_modules`). The preset's kl_coefficient is not
    the optimizer's: read it as `MuGrokConfig.from_phase(phase).kl_coefficient`."""
    config = MuGrokConfig.from_phase(phase)
    optimizer = MuonGrokfast(muon_param_groups(model), **{**config.to_kwargs(), **overrides})
    register_qk_clip_modules(optimizer, model)
    return optimizer


def register_qk_clip_modules(optimizer: MuonGrokfast, model: nn.Module) -> None:
    """Register with `optimizer` for QK-clip every module of `model` implementing
    `forge.optim.qk_clip.QKLogitRecorder`; a model without any is left as it is."""
    if qk_logit_recorders(model):
        optimizer.register_attention(model)
