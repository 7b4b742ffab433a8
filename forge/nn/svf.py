"""Singular value fine-tuning (SVF) of Transformer² (Sun et al. 2025, arXiv 2501.06252; SakanaAI/self-adaptive-llms).

A linear weight W = U·diag(s)·Vᵀ (one SVD in fp32, computed once and cached) is adapted by a vector z that scales
its top-k singular values:

    W' = U·diag(s ⊙ z)·Vᵀ · (Σs / Σ(s ⊙ z)),   z = sigmoid(p)·max_mult   (values past the top k keep z = 1)

Only p trains (one vector of k values per matrix). The paper starts p at 0.1 (+ noise) with max_mult 1, so
z ≈ 0.52 everywhere, which the rescale cancels only when every singular value is adapted; here p starts at
logit(1/max_mult) (max_mult > 1, default 2), so z = 1 and W' = W exactly at initialization whatever k is, and
z may grow a value up to max_mult times. The layer computes W' = c·(W + U_k·diag(s_k ⊙ (z − 1))·V_kᵀ) with
c = Σs / (Σs + Σ s_k(z − 1)), the same matrix written so that z = 1 gives W bit for bit.

An expert is the set of z-vectors, {module name: z}; it can be set on the layers (`set_expert`, also for a
mixture z' = 1 + Σ α_k (z_k − 1), see `mix_experts`), folded into plain nn.Linear weights (`fold_svf`), and
saved as a small safetensors file of its own (`save_expert` / `load_expert`).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")   # the paper's default: only the MLP weights are adapted


class SVFLinear(nn.Module):
    """An nn.Linear whose top-`k` singular values are scaled by z = sigmoid(p)·max_mult (see the module).
    The base weight and bias are frozen buffers-in-parameters (requires_grad False); only `p` trains."""

    def __init__(self, linear: nn.Linear, k: int, max_mult: float = 2.0):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid svf_singular_values: {k!r}; expected an integer >= 1")
        if not (isinstance(max_mult, (int, float)) and math.isfinite(max_mult) and max_mult > 1):
            raise ValueError(f"Invalid max_mult: {max_mult!r}; expected a number > 1 (z = 1 needs it)")
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_mult = float(max_mult)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        self.k = min(k, s.numel())
        self.register_buffer("u", u[:, : self.k].contiguous(), persistent=False)
        self.register_buffer("s", s[: self.k].contiguous(), persistent=False)
        self.register_buffer("vh", vh[: self.k].contiguous(), persistent=False)
        self.register_buffer("s_total", s.double().sum().float(), persistent=False)
        self.p = nn.Parameter(torch.full((self.k,), math.log(1.0 / (self.max_mult - 1.0)),
                                         dtype=torch.float32, device=weight.device))
        self.z_override: torch.Tensor | None = None   # a fixed z (an expert or a mixture) instead of sigmoid(p)

    def z(self) -> torch.Tensor:
        """The scale of each adapted singular value: the override if set, else sigmoid(p)·max_mult."""
        if self.z_override is not None:
            return self.z_override
        return torch.sigmoid(self.p) * self.max_mult

    def adapted_weight(self) -> torch.Tensor:
        """W' = c·(W + U_k diag(s_k(z−1)) V_kᵀ), c = Σs / (Σs + Σ s_k(z−1)) (fp32, then W's dtype)."""
        delta = self.s * (self.z() - 1.0)
        scale = self.s_total / (self.s_total + delta.sum())
        weight = (self.weight.float() + (self.u * delta) @ self.vh) * scale
        return weight.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.adapted_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, max_mult={self.max_mult:g}"


def add_svf(model: nn.Module, k: int, max_mult: float = 2.0, targets=MLP_TARGETS) -> nn.Module:
    """A copy of `model` whose nn.Linear modules named (last component) in `targets` are SVFLinear layers;
    every other parameter is frozen, so the copy's only trainable parameters are the p vectors."""
    adapted = copy.deepcopy(model)
    for param in adapted.parameters():
        param.requires_grad_(False)
    found = [(name, module) for name, module in adapted.named_modules()
             if isinstance(module, nn.Linear) and name.split(".")[-1] in targets]
    if not found:
        raise ValueError(f"model has no nn.Linear named one of {list(targets)} to adapt")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name) if parent_name else adapted
        setattr(parent, child, SVFLinear(module, k, max_mult))
    return adapted


def svf_layers(model: nn.Module) -> dict[str, SVFLinear]:
    """Every SVFLinear of `model` by module name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SVFLinear)}
    if not layers:
        raise ValueError("model has no SVFLinear layers (call add_svf first)")
    return layers


def expert_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's current expert: z of every SVF layer (detached fp32 copies), by module name."""
    return {name: layer.z().detach().float().clone() for name, layer in svf_layers(model).items()}


def set_expert(model: nn.Module, expert: dict[str, torch.Tensor] | None) -> nn.Module:
    """Fix z of every SVF layer to `expert`'s vectors (None: back to the trainable sigmoid(p)·max_mult)."""
    layers = svf_layers(model)
    if expert is not None:
        _check_expert(expert, layers)
    for name, layer in layers.items():
        layer.z_override = None if expert is None else expert[name].to(layer.s.device, torch.float32)
    return model


def mix_experts(experts: list[dict[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
    """z' = 1 + Σ_k α_k (z_k − 1) per layer: Transformer²'s few-shot mixture z' = Σ_k α_k z_k written around the
    base (equal to it whenever Σα = 1), so that α = 0 is the base model and a zero weight needs none of that
    expert's values. `weights`: a list of floats, or per layer {name: list of floats} (a mixture per layer group)."""
    first = weights if not isinstance(weights, dict) else next(iter(weights.values()), [])
    if not experts or len(first) != len(experts):
        raise ValueError(f"weights must have one value per expert ({len(experts)})")
    out = {}
    for name in experts[0]:
        alpha = weights[name] if isinstance(weights, dict) else weights
        out[name] = 1.0 + sum(float(a) * (e[name] - 1.0) for a, e in zip(alpha, experts))
    return out


def identity_expert(model: nn.Module) -> dict[str, torch.Tensor]:
    """z = 1 everywhere: the base model."""
    return {name: torch.ones(layer.k) for name, layer in svf_layers(model).items()}


def fold_svf(model: nn.Module, expert: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` with every SVF layer replaced by a plain nn.Linear holding W' (of `expert` if given,
    else of the layer's current z): runs without this module's code."""
    folded = copy.deepcopy(model)
    if expert is not None:
        set_expert(folded, expert)
    for name, layer in svf_layers(folded).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.adapted_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, child, linear)
    for param in folded.parameters():
        param.requires_grad_(True)
    return folded


def svf_parameter_count(model: nn.Module) -> int:
    """Trainable values of one expert: Σ k over the SVF layers."""
    return sum(layer.k for layer in svf_layers(model).values())


def lora_parameter_count(model: nn.Module, rank: int = 8) -> int:
    """Parameters of a rank-`rank` LoRA on the same matrices: Σ rank·(in + out) (Hu et al. 2021)."""
    return sum(rank * (layer.in_features + layer.out_features) for layer in svf_layers(model).values())


def save_expert(path, expert: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write an expert's z-vectors as safetensors (metadata: a JSON object stored under "forge")."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: z.detach().float().contiguous().cpu() for name, z in expert.items()}, str(path),
              metadata={"forge": json.dumps(metadata or {})})
    return path


def load_expert(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(z-vectors by module name, metadata) from a `save_expert` file (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        expert = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = json.loads((handle.metadata() or {}).get("forge", "{}"))
    return expert, metadata


def _check_expert(expert: dict, layers: dict[str, SVFLinear]) -> None:
    missing, extra = set(layers) - set(expert), set(expert) - set(layers)
    if missing or extra:
        raise ValueError(f"expert does not fit the model: missing {sorted(missing)}, unknown {sorted(extra)}")
    for name, layer in layers.items():
        if tuple(expert[name].shape) != (layer.k,):
            raise ValueError(f"expert[{name!r}] has shape {tuple(expert[name].shape)}; the layer adapts {layer.k}")
