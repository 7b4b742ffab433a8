"""Which parameters Muon should take: hidden-layer matrices; everything else goes to AdamW."""
from __future__ import annotations

from torch import nn

#: Module names (last component) treated as the output head, which Muon should not orthogonalize.
HEAD_NAMES = ("lm_head", "head", "output", "classifier")


def muon_param_groups(model: nn.Module, head_names=HEAD_NAMES, adamw_modules=()) -> list[dict]:
    """Two parameter groups for MuonGrokfast, built by module type (Keller Jordan's advice for Muon):

    - Muon: weights of 2 or more dimensions in hidden layers (Linear, Conv, and other matrices);
    - AdamW: embeddings (and any weight tied to one), the output head (a module named in `head_names`),
      modules listed in `adamw_modules`, and every 0-D/1-D parameter (norm gains, biases).
    Each group names its parameters (`param_names`), so errors can name them too.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    forced = {id(p) for m in adamw_modules for p in m.parameters()}
    head_params = {id(p) for name, m in model.named_modules() if name.split(".")[-1] in head_names
                   for p in m.parameters()}
    groups = {True: ([], []), False: ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        to_adamw = p.dim() < 2 or id(p) in embedding_params | forced | head_params
        params, names = groups[not to_adamw]
        params.append(p)
        names.append(name)
    return [{"params": params, "param_names": names, "use_muon": use_muon}
            for use_muon, (params, names) in groups.items() if params]
