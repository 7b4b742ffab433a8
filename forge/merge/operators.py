"""Merge operators on state dicts of models with one architecture (Phase 2, EvoMerge).

Every operator takes state dicts (`dict[str, Tensor]`) with the same keys, shapes and dtypes, does its
arithmetic in float32 (float64 for float64 inputs), never modifies its inputs, and returns a new state
dict in the inputs' dtypes. Non-floating tensors (e.g. integer buffers) must be equal in every input
and are copied. Task-vector methods (TIES, DARE) also take `base`, the shared initialization the
inputs were trained from: tau_i = theta_i - base.

Layer-wise operators (frankenmerge, dfs) find a parameter's layer with `layer_key_fn(name) -> int |
None` (default `block_index`: the "blocks.<i>." naming of forge.nn.Transformer) and rename a layer's
parameters for a new position with `rename_fn(name, index)` (default `rename_block`).

A `Recipe` (operator name + JSON parameters) describes one merge; `apply_recipe` runs it. Recipes
refer to the input models by their index in `states`.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from forge._checks import check_finite_number

StateDict = dict[str, torch.Tensor]
LayerKeyFn = Callable[[str], "int | None"]
RenameFn = Callable[[str, int], str]

OPERATORS = ("linear", "slerp", "ties", "dare", "frankenmerge", "dfs")

# |cos(a, b)| above this: the vectors are (anti)colinear, sin(theta) ~ 0, and SLERP falls back to
# linear interpolation (the DOT_THRESHOLD of mergekit's slerp).
SLERP_COLINEAR_THRESHOLD = 0.9995

_BLOCK_RE = re.compile(r"(^|\.)blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """Layer index of a parameter named like "blocks.<i>.…" (or "<prefix>.blocks.<i>.…"); None otherwise."""
    match = _BLOCK_RE.search(name)
    return int(match.group(2)) if match else None


def rename_block(name: str, index: int) -> str:
    """The name `name` would have in layer `index` ("blocks.3.mlp.w" -> "blocks.<index>.mlp.w")."""
    return _BLOCK_RE.sub(lambda m: f"{m.group(1)}blocks.{index}.", name, count=1)


# ---------------------------------------------------------------- input checks and per-tensor loop

def _check_layout(name: str, state, ref_name: str, ref: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    missing, extra = sorted(ref.keys() - state.keys()), sorted(state.keys() - ref.keys())
    if missing or extra:
        raise ValueError(f"{name} has different keys from {ref_name}: missing {missing[:5]}, extra {extra[:5]}")
    for key, expected in ref.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(got).__name__}")
        if got.shape != expected.shape:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(got.shape)}, {ref_name} has {tuple(expected.shape)}")
        if got.dtype != expected.dtype:
            raise ValueError(f"{name}[{key!r}] has dtype {got.dtype}, {ref_name} has {expected.dtype}")
        if got.device != expected.device:
            raise ValueError(f"{name}[{key!r}] is on {got.device}, {ref_name} is on {expected.device}")


def check_states(states, base=None, min_count: int = 1) -> list[StateDict]:
    """Validate a list of state dicts (and `base`, when given) with one layout; returns the list."""
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(f"states must be a list of state dicts, got {type(states).__name__}")
    if len(states) < min_count:
        raise ValueError(f"states has {len(states)} state dicts; expected at least {min_count}")
    if not isinstance(states[0], Mapping) or not states[0]:
        raise ValueError("states[0] must be a non-empty state dict")
    for i, state in enumerate(states[1:], start=1):
        _check_layout(f"states[{i}]", state, "states[0]", states[0])
    if base is not None:
        _check_layout("base", base, "states[0]", states[0])
    return list(states)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_tensor(states: list[StateDict], fn, base: StateDict | None = None) -> StateDict:
    """out[key] = fn(key, [inputs in the work dtype], base in the work dtype or None), cast back."""
    out = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            if any(not torch.equal(s[key], ref) for s in states[1:]):
                raise ValueError(f"non-float tensor {key!r} differs between the states; it cannot be merged")
            out[key] = ref.clone()
            continue
        work = _work_dtype(ref)
        xs = [s[key].to(work) for s in states]
        result = fn(key, xs, None if base is None else base[key].to(work))
        out[key] = result.to(ref.dtype)
    return out


def normalized_weights(weights, count: int, nonnegative: bool = False) -> list[float]:
    """`weights` (None = equal) scaled to sum to 1; a clear error when they sum to 0."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        raise ValueError(f"weights must be a list of {count} numbers (one per state), got {weights!r}")
    low = 0.0 if nonnegative else -math.inf
    values = [check_finite_number(f"weights[{i}]", w, low=low) for i, w in enumerate(weights)]
    total = math.fsum(values)
    if abs(total) < 1e-12:
        raise ValueError(f"weights {values} sum to 0; they must have a non-zero sum")
    return [v / total for v in values]


def _weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        out = out + x * w
    return out


# ---------------------------------------------------------------- linear and SLERP

def linear(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted average sum_i w_i theta_i with w normalized to sum 1 (model soups, Wortsman et al. 2022)."""
    states = check_states(states)
    w = normalized_weights(weights, len(states))
    return _per_tensor(states, lambda key, xs, base: _weighted_sum(xs, w))


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (Shoemake 1985, as in mergekit's slerp).

    theta = arccos(<a, b> / |a||b|); result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
    Falls back to (1-t) a + t b when |cos theta| > SLERP_COLINEAR_THRESHOLD or a vector is zero.
    """
    av, bv = a.reshape(-1), b.reshape(-1)
    norms = float(av.norm()) * float(bv.norm())
    cos = float(av @ bv) / norms if norms > 0 else 1.0
    if abs(cos) > SLERP_COLINEAR_THRESHOLD:
        return a * (1.0 - t) + b * t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return a * (math.sin((1.0 - t) * theta) / sin_theta) + b * (math.sin(t * theta) / sin_theta)


def slerp(a: StateDict, b: StateDict, t: float) -> StateDict:
    """Per tensor SLERP from `a` (t=0) to `b` (t=1); see `slerp_tensor`."""
    t = check_finite_number("t", t, 0.0, 1.0)
    states = check_states([a, b])
    return _per_tensor(states, lambda key, xs, base: slerp_tensor(xs[0], xs[1], t))


def _slerp_chain(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc, acc_weight = xs[0], weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        if w == 0.0:
            continue
        acc_weight += w
        acc = slerp_tensor(acc, x, w / acc_weight)
    return acc


def slerp_many(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """SLERP of several models, chained in order: m_1 = x_1, m_k = slerp(m_{k-1}, x_k, w_k / (w_1+…+w_k)).

    Weights are non-negative (None = equal). With two models, weights (1-t, t) give slerp(a, b, t);
    on colinear tensors the chain is the weighted average. The result depends on the order.
    """
    states = check_states(states)
    w = normalized_weights(weights, len(states), nonnegative=True)
    return _per_tensor(states, lambda key, xs, base: _slerp_chain(xs, w))


# ---------------------------------------------------------------- TIES and DARE

def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, round(density * numel)) entries of largest magnitude, zero the rest (TIES step 1)."""
    flat = tau.reshape(-1)
    k = max(1, min(flat.numel(), int(density * flat.numel() + 0.5)))
    if k == flat.numel():
        return tau.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties_combine(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging of task vectors (Yadav et al. 2023, arXiv 2306.01708, Alg. 1): trim, elect, disjoint mean.

    t_i = w_i * trim(tau_i); elected sign s = sign(sum_i t_i); result = sum_i t_i [sign t_i = s] /
    sum_i w_i [sign t_i = s] (the mean over the agreeing, non-zero entries; 0 where none agree).
    With equal weights this is the paper's disjoint mean.
    """
    trimmed = torch.stack([trim_to_density(tau, density) * w for tau, w in zip(taus, weights)])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device).view(-1, *([1] * taus[0].dim()))
    numerator = (trimmed * agree).sum(dim=0)
    denominator = (w * agree).sum(dim=0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


def _check_base(base, op: str) -> None:
    if base is None:
        raise ValueError(f"{op} needs base: the shared initialization the models were trained from")


def ties(states: Sequence[StateDict], weights: Sequence[float] | None, base: StateDict,
         density: float = 0.2, scale: float = 1.0) -> StateDict:
    """TIES-Merging: base + scale * ties_combine(theta_i - base). Weights are non-negative (None = equal)."""
    _check_base(base, "ties")
    states = check_states(states, base)
    w = normalized_weights(weights, len(states), nonnegative=True)
    density = check_finite_number("density", density, 0.0, 1.0, low_open=True)
    scale = check_finite_number("scale", scale)

    def merge(key, xs, b):
        return b + scale * ties_combine([x - b for x in xs], w, density)
    return _per_tensor(states, merge, base)


def dare_masks(key: str, shape: torch.Size, count: int, drop_rate: float, seed: int) -> list[torch.Tensor]:
    """Keep-masks (True = keep, probability 1 - drop_rate) for `count` models, reproducible from (seed, key).

    The generator is seeded from the seed and a CRC of the tensor's name, so masks do not depend on
    the order of the state dict.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return [torch.rand(shape, generator=gen) >= drop_rate for _ in range(count)]


def dare(states: Sequence[StateDict], weights: Sequence[float] | None, base: StateDict,
         drop_rate: float = 0.5, seed: int = 0, combine: str = "linear", density: float = 1.0,
         scale: float = 1.0) -> StateDict:
    """DARE (Yu et al. 2023, arXiv 2311.03099): drop each task-vector entry with probability p, scale the
    kept ones by 1/(1-p), then combine: "linear" = base + scale * sum_i w_i tau_i' (w normalized), or
    "ties" = base + scale * ties_combine(tau', w, density) (DARE-TIES). E[tau_i'] = tau_i.
    """
    _check_base(base, "dare")
    states = check_states(states, base)
    if combine not in ("linear", "ties"):
        raise ValueError(f"combine must be 'linear' or 'ties', got {combine!r}")
    w = normalized_weights(weights, len(states), nonnegative=combine == "ties")
    p = check_finite_number("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
    density = check_finite_number("density", density, 0.0, 1.0, low_open=True)
    scale = check_finite_number("scale", scale)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    def merge(key, xs, b):
        masks = dare_masks(key, b.shape, len(xs), p, seed)
        taus = [(x - b) * m.to(b.device) / (1.0 - p) for x, m in zip(xs, masks)]
        merged = _weighted_sum(taus, w) if combine == "linear" else ties_combine(taus, w, density)
        return b + scale * merged
    return _per_tensor(states, merge, base)


# ---------------------------------------------------------------- layer-wise: FrankenMerge and DFS

def count_layers(state: Mapping[str, torch.Tensor], layer_key_fn: LayerKeyFn = block_index) -> int:
    """Number of layers L in `state`; the layer indices found must be exactly 0..L-1 (0 when none)."""
    indices = {layer_key_fn(name) for name in state} - {None}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layer indices {sorted(indices)} are not 0..{len(indices) - 1}; check layer_key_fn")
    return len(indices)


def _check_path(path, n_models: int, n_layers: int) -> list[tuple[int, int]]:
    if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or len(path) == 0:
        raise ValueError(f"path must be a non-empty list of (model, layer) pairs, got {path!r}")
    pairs = []
    for j, pick in enumerate(path):
        ok = isinstance(pick, Sequence) and len(pick) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pick)
        if not ok or not (0 <= pick[0] < n_models and 0 <= pick[1] < n_layers):
            raise ValueError(f"path[{j}] = {pick!r}; expected (model, layer) with model in 0..{n_models - 1} "
                             f"and layer in 0..{n_layers - 1}")
        pairs.append((pick[0], pick[1]))
    return pairs


def dfs(states: Sequence[StateDict], path: Sequence[tuple[int, int]], layer_key_fn: LayerKeyFn = block_index,
        rename_fn: RenameFn = rename_block, rest_weights: Sequence[float] | None = None) -> tuple[StateDict, int]:
    """Data-flow-space merge (Akiba et al. 2024, arXiv 2403.13187, Sec. 3.2): the child's layer j is
    layer path[j][1] of model path[j][0], copied unchanged; the depth is len(path), which may differ
    from the parents'. Parameters outside the layers (embeddings, final norm, head) are the linear mix
    of the parents with `rest_weights` (None = equal; one-hot = one chosen parent). The paper's learned
    per-layer input scaling W is not modelled (it has no place in a plain state dict).

    Returns (state, n_layers). Build the child with the parents' config and the new depth, e.g.
    `TransformerConfig.from_dict({**config.to_dict(), "n_layers": n_layers})` (or
    `dataclasses.replace(config, n_layers=n_layers)`), then `model.load_state_dict(state)`.
    """
    states = check_states(states)
    n_layers = count_layers(states[0], layer_key_fn)
    if n_layers == 0:
        raise ValueError("dfs/frankenmerge: no layer parameters found by layer_key_fn in states[0]")
    picks = _check_path(path, len(states), n_layers)
    layer_keys: dict[int, list[str]] = {i: [] for i in range(n_layers)}
    rest = []
    for name in states[0]:
        index = layer_key_fn(name)
        (rest if index is None else layer_keys[index]).append(name)
    out = linear([{k: s[k] for k in rest} for s in states], rest_weights) if rest else {}
    for j, (model, layer) in enumerate(picks):
        for name in layer_keys[layer]:
            new_name = rename_fn(name, j)
            if layer_key_fn(new_name) != j:
                raise ValueError(f"rename_fn({name!r}, {j}) gave {new_name!r}, which layer_key_fn puts in layer "
                                 f"{layer_key_fn(new_name)}; the two functions must agree")
            out[new_name] = states[model][name].clone()
    return out, len(picks)


def frankenmerge(states: Sequence[StateDict], layer_sources: Sequence[int], layer_key_fn: LayerKeyFn = block_index,
                 rename_fn: RenameFn = rename_block, rest_weights: Sequence[float] | None = None) -> StateDict:
    """Per-layer selection (FrankenMerge): layer i of the child is layer i of states[layer_sources[i]];
    same depth as the parents. Non-layer parameters as in `dfs` (linear mix with `rest_weights`)."""
    states = check_states(states)
    n_layers = count_layers(states[0], layer_key_fn)
    if isinstance(layer_sources, (str, bytes)) or not isinstance(layer_sources, Sequence) \
            or len(layer_sources) != n_layers:
        raise ValueError(f"layer_sources must list one model index per layer ({n_layers}), got {layer_sources!r}")
    for i, m in enumerate(layer_sources):
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < len(states):
            raise ValueError(f"layer_sources[{i}] = {m!r}; expected a model index in 0..{len(states) - 1}")
    state, _ = dfs(states, [(m, i) for i, m in enumerate(layer_sources)], layer_key_fn, rename_fn, rest_weights)
    return state


# ---------------------------------------------------------------- recipes

_RECIPE_PARAMS = {
    "linear": {"weights"},
    "slerp": {"weights"},
    "ties": {"weights", "density", "scale"},
    "dare": {"weights", "drop_rate", "seed", "combine", "density", "scale"},
    "frankenmerge": {"layer_sources", "weights"},
    "dfs": {"path", "weights"},
}


def _rounded(value):
    """Floats rounded to 6 decimals, tuples as lists: the canonical JSON form of recipe parameters."""
    if isinstance(value, float):
        return round(value, 6) + 0.0
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _rounded(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, eq=False)
class Recipe:
    """One merge: an operator from OPERATORS and its parameters (JSON values; models by index).

    Parameters per operator: linear/slerp {weights}; ties {weights, density, scale}; dare {weights,
    drop_rate, seed, combine, density, scale}; frankenmerge {layer_sources, weights}; dfs {path,
    weights}. In frankenmerge/dfs `weights` mix the non-layer parameters. Omitted ones take the
    operator's default. Floats are rounded to 6 decimals so that equal recipes have equal keys.
    """
    operator: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.operator not in _RECIPE_PARAMS:
            raise ValueError(f"Recipe.operator must be one of {list(OPERATORS)}, got {self.operator!r}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"Recipe.params must be a dict, got {type(self.params).__name__}")
        unknown = sorted(set(self.params) - _RECIPE_PARAMS[self.operator])
        if unknown:
            raise ValueError(f"Recipe.params for {self.operator!r} has unknown keys {unknown}; "
                             f"allowed: {sorted(_RECIPE_PARAMS[self.operator])}")
        object.__setattr__(self, "params", json.loads(json.dumps(_rounded(dict(self.params)))))

    def to_dict(self) -> dict:
        return {"operator": self.operator, "params": json.loads(json.dumps(self.params))}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        if not isinstance(data, Mapping) or "operator" not in data:
            raise ValueError(f"a recipe dict needs 'operator' (and 'params'), got {data!r}")
        return cls(data["operator"], dict(data.get("params", {})))

    def key(self) -> str:
        """Canonical JSON string: equal for equal recipes (used as the fitness cache key)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


def _pairs(path) -> list:
    return [tuple(p) if isinstance(p, list) else p for p in path]


def apply_recipe(recipe: Recipe, states: Sequence[StateDict], base: StateDict | None = None,
                 layer_key_fn: LayerKeyFn = block_index, rename_fn: RenameFn = rename_block) -> tuple[StateDict, int]:
    """Run `recipe` on `states` (and `base` for ties/dare); returns (state, n_layers of the child)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    p, op = recipe.params, recipe.operator
    w = p.get("weights")
    if op == "dfs":
        if "path" not in p:
            raise ValueError("Recipe 'dfs' needs params['path'], a list of [model, layer] pairs")
        return dfs(states, _pairs(p["path"]), layer_key_fn, rename_fn, w)
    if op == "frankenmerge":
        if "layer_sources" not in p:
            raise ValueError("Recipe 'frankenmerge' needs params['layer_sources'], one model index per layer")
        state = frankenmerge(states, p["layer_sources"], layer_key_fn, rename_fn, w)
    elif op == "linear":
        state = linear(states, w)
    elif op == "slerp":
        state = slerp_many(states, w)
    elif op == "ties":
        state = ties(states, w, base, p.get("density", 0.2), p.get("scale", 1.0))
    else:
        extra = {k: p[k] for k in ("drop_rate", "seed", "combine", "density", "scale") if k in p}
        state = dare(states, w, base, **extra)
    return state, count_layers(state, layer_key_fn)
