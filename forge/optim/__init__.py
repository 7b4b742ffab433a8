"""forge.optim: MuonGrokfast (Muon + AdamW + Grokfast + QK-clip), its parameter groups and presets."""
from forge.optim.kl import KLRegularizer
from forge.optim.muon_grokfast import MuonGrokfast
from forge.optim.param_groups import muon_param_groups
from forge.optim.presets import PHASE_PRESETS, MuGrokConfig, create_optimizer_from_phase

__all__ = ["KLRegularizer", "MuGrokConfig", "MuonGrokfast", "PHASE_PRESETS", "create_optimizer_from_phase",
           "muon_param_groups"]
