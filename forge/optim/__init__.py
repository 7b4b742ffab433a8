"""forge.optim: MuonGrokfast (Muon + AdamW + Grokfast + QK-clip), its parameter groups and presets.

It knows no model class: QK-clip works on any module implementing `QKLogitRecorder` (forge.optim.qk_clip).
"""
from forge.optim.muon_grokfast import MuonGrokfast
from forge.optim.param_groups import muon_param_groups
from forge.optim.presets import PHASE_PRESETS, MuGrokConfig, create_optimizer_from_phase
from forge.optim.qk_clip import QKLogitRecorder, qk_clip_

__all__ = ["MuGrokConfig", "MuonGrokfast", "PHASE_PRESETS", "QKLogitRecorder", "create_optimizer_from_phase",
           "muon_param_groups", "qk_clip_"]
