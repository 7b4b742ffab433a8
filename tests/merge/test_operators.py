"""Merge operators against float64 computations written out here, on small random state dicts."""
import json
import math

import pytest
import torch

from forge.merge import (
    SLERP_COLINEAR_THRESHOLD, Recipe, apply_recipe, block_index, count_layers, dare, dfs, frankenmerge, linear,
    rename_block, slerp, slerp_many, ties,
)
from forge.nn import Transformer, TransformerConfig

FLOAT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def make_state(seed: int, dtype=torch.float32, scale: float = 1.0) -> dict:
    """Two 'layers' plus embed/norm/head, with 1xn, nx1, odd, 0-d and non-contiguous tensors and an int buffer."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return {
        "embed.weight": r(7, 5),
        "blocks.0.w": r(1, 9),
        "blocks.0.b": r(9, 1),
        "blocks.0.s": r(),
        "blocks.1.w": r(5, 3).t(),          # non-contiguous view
        "blocks.1.b": r(11),
        "norm.weight": r(5),
        "head.weight": r(3, 7)[:, ::2],     # strided view
        "step": torch.tensor([3, 4], dtype=torch.int64),
    }


def make_family(n: int = 3, dtype=torch.float32):
    """`n` models fine-tuned from one base: base + small task vectors."""
    base = make_state(100, dtype)
    states = [{k: (v + make_state(i, torch.float64, 0.3)[k].to(v.dtype)) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for i in range(n)]
    return states, base


def float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err} > {tol * scale}"


def snapshot(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def assert_unchanged(states, copies):
    for s, c in zip(states, copies):
        for k in c:
            assert torch.equal(s[k], c[k]), f"input tensor {k} was modified"


ALL_RECIPES = [
    Recipe("linear", {"weights": [0.2, 0.3, 0.5]}),
    Recipe("slerp", {"weights": [1, 1, 2]}),
    Recipe("ties", {"weights": [1, 2, 1], "density": 0.5, "scale": 0.8}),
    Recipe("dare", {"drop_rate": 0.3, "seed": 7}),
    Recipe("dare", {"drop_rate": 0.3, "seed": 7, "combine": "ties", "density": 0.6}),
    Recipe("frankenmerge", {"layer_sources": [2, 0]}),
    Recipe("dfs", {"path": [[0, 1], [2, 0], [1, 1]]}),
]


# ---------------------------------------------------------------- all operators

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda r: r.operator)
def test_inputs_untouched_dtype_preserved_int_buffer_copied(recipe, dtype):
    states, base = make_family(3, dtype)
    copies, base_copy = snapshot(states), snapshot([base])
    out, n_layers = apply_recipe(recipe, states, base)
    assert_unchanged(states, copies)
    assert_unchanged([base], base_copy)
    assert n_layers == (3 if recipe.operator == "dfs" else 2)
    for k, v in out.items():
        assert v.dtype == (torch.int64 if k == "step" else dtype), k
        assert torch.isfinite(v.double()).all(), k
    assert torch.equal(out["step"], base["step"])
    for k, v in out.items():   # the result owns its memory
        assert all(v.data_ptr() != s[k].data_ptr() for s in states if k in s), k


@pytest.mark.parametrize("op", ["linear", "slerp", "ties", "dare", "frankenmerge", "dfs"])
def test_mismatched_inputs_are_refused(op):
    states, base = make_family(3)
    bad_key = [states[0], states[1], {**states[2], "extra.weight": torch.zeros(2)}]
    bad_shape = [states[0], {**states[1], "norm.weight": torch.zeros(6)}, states[2]]
    bad_dtype = [states[0], {**states[1], "norm.weight": states[1]["norm.weight"].half()}, states[2]]
    recipe = next(r for r in ALL_RECIPES if r.operator == op)
    with pytest.raises(ValueError, match="extra.weight"):
        apply_recipe(recipe, bad_key, base)
    with pytest.raises(ValueError, match="norm.weight.*shape"):
        apply_recipe(recipe, bad_shape, base)
    with pytest.raises(ValueError, match="dtype"):
        apply_recipe(recipe, bad_dtype, base)


def test_base_mismatch_and_missing_base_are_refused():
    states, base = make_family(3)
    with pytest.raises(ValueError, match="base.*shape"):
        ties(states, None, {**base, "blocks.1.b": torch.zeros(3)})
    with pytest.raises(ValueError, match="needs base"):
        ties(states, None, None)
    with pytest.raises(ValueError, match="needs base"):
        dare(states, None, None)


def test_non_float_buffers_must_agree():
    states, _ = make_family(2)
    states[1]["step"] = torch.tensor([3, 5])
    with pytest.raises(ValueError, match="non-float tensor 'step'"):
        linear(states)


# ---------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_matches_float64_weighted_average(dtype):
    states, _ = make_family(3, dtype)
    out = linear(states, [1.0, 2.0, 5.0])
    for k in float_keys(out):
        expected = (1 * states[0][k].double() + 2 * states[1][k].double() + 5 * states[2][k].double()) / 8
        assert_close(out[k], expected, FLOAT_TOL[dtype], k)
    equal = linear(states)
    for k in float_keys(out):
        assert_close(equal[k], sum(s[k].double() for s in states) / 3, FLOAT_TOL[dtype], k)


def test_linear_negative_weights_and_bad_weights():
    states, _ = make_family(2)
    out = linear(states, [2.0, -1.0])   # extrapolation: 2a - b
    assert_close(out["blocks.0.w"], 2 * states[0]["blocks.0.w"].double() - states[1]["blocks.0.w"].double(), 1e-5)
    with pytest.raises(ValueError, match="sum to 0"):
        linear(states, [1.0, -1.0])
    with pytest.raises(ValueError, match="list of 2 numbers"):
        linear(states, [1.0])
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        linear(states, [1.0, math.nan])


# ---------------------------------------------------------------- SLERP

def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().reshape(-1), v.double().reshape(-1)
    return math.acos(max(-1.0, min(1.0, float(u @ v / (u.norm() * v.norm())))))


def slerp64(a, b, t):
    """SLERP in float64; lerp for (anti)colinear vectors (every 1-element tensor is colinear)."""
    a, b = a.double(), b.double()
    th = angle(a, b)
    if abs(math.cos(th)) > SLERP_COLINEAR_THRESHOLD:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_float64_and_endpoints(t):
    states, _ = make_family(2)
    a, b = states
    out = slerp(a, b, t)
    for k in float_keys(out):
        assert_close(out[k], slerp64(a[k], b[k], t), 1e-5, k)
        if t == 0.0:
            assert_close(out[k], a[k], 1e-6, k)
        if t == 1.0:
            assert_close(out[k], b[k], 1e-6, k)


def test_slerp_keeps_norm_and_splits_the_angle():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 6, generator=g)
    b = torch.randn(4, 6, generator=g)
    b = b * (a.norm() / b.norm())            # equal norms
    theta = angle(a, b)
    for t in (0.25, 0.5, 0.9):
        out = slerp({"x": a}, {"x": b}, t)["x"]
        assert out.double().norm().item() == pytest.approx(a.double().norm().item(), rel=1e-5)
        assert angle(a, out) == pytest.approx(t * theta, abs=1e-5)
        assert angle(out, b) == pytest.approx((1 - t) * theta, abs=1e-5)
        lerp_norm = (a * (1 - t) + b * t).double().norm().item()
        assert lerp_norm < out.double().norm().item() - 1e-3   # the chord is shorter than the arc


def test_slerp_colinear_and_zero_fall_back_to_lerp():
    a = torch.randn(3, 5)
    for b in (2.5 * a, -a, torch.zeros_like(a)):
        out = slerp({"x": a}, {"x": b}, 0.3)["x"]
        assert_close(out, 0.7 * a.double() + 0.3 * b.double(), 1e-6)
    # just below the threshold: a real slerp, different from lerp
    u = torch.tensor([1.0, 0.0])
    cos = SLERP_COLINEAR_THRESHOLD - 0.002
    v = torch.tensor([cos, math.sqrt(1 - cos * cos)])
    out = slerp({"x": u}, {"x": v}, 0.5)["x"]
    assert_close(out, slerp64(u, v, 0.5), 1e-6)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_slerp_many_chain():
    states, _ = make_family(3)
    two = slerp_many(states[:2], [0.7, 0.3])
    direct = slerp(states[0], states[1], 0.3)
    for k in float_keys(two):
        assert_close(two[k], direct[k].double(), 1e-6, k)
    out = slerp_many(states, [1.0, 1.0, 2.0])
    for k in float_keys(out):
        step1 = slerp64(states[0][k], states[1][k], 0.5)
        assert_close(out[k], slerp64(step1, states[2][k], 0.5), 1e-5, k)
    single = slerp_many(states[:1])
    assert all(torch.equal(single[k], states[0][k]) for k in states[0])
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        slerp_many(states, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="t"):
        slerp(states[0], states[1], 1.5)


# ---------------------------------------------------------------- TIES

def test_ties_by_hand():
    base = {"x": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])}
    taus = [[3, -1, 0.5, 2, -4], [-2, 1.5, 0.2, 1, 5], [1, -3, 0.1, -0.5, 0.3]]
    states = [{"x": base["x"] + torch.tensor(t)} for t in taus]
    # density 0.6 keeps 3 of 5 per model: [3,0,0,2,-4], [-2,1.5,0,0,5], [1,-3,0,-0.5,0]
    # signs of the sums (2, -1.5, 0, 1.5, 1): + - 0 + +; disjoint means: (3+1)/2, -3, 0, 2, 5
    out = ties(states, None, base, density=0.6)["x"]
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 1.0, 3.0, 6.0]))
    half = ties(states, None, base, density=0.6, scale=0.5)["x"]
    assert torch.allclose(half, 1.0 + 0.5 * torch.tensor([2.0, -3.0, 0.0, 2.0, 5.0]))
    # weights 1:1:2 -> weighted sums (3, -4.5, 0, 1, 1): + - 0 + +; weighted means of the agreeing entries
    weighted = ties(states, [1, 1, 2], base, density=0.6)["x"]
    expected = torch.tensor([(3 + 2 * 1) / 3, (2 * -3) / 2, 0.0, 2.0, 5.0]) + 1.0
    assert torch.allclose(weighted, expected)


def ties64(xs, base, weights, density):
    """Element-by-element TIES in Python floats."""
    n = base.numel()
    k = max(1, min(n, int(density * n + 0.5)))
    taus = [(x.double() - base.double()).reshape(-1).tolist() for x in xs]
    trimmed = []
    for tau, w in zip(taus, weights):
        keep = set(sorted(range(n), key=lambda i: -abs(tau[i]))[:k])
        trimmed.append([w * tau[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        total = sum(t[i] for t in trimmed)
        sign = (total > 0) - (total < 0)
        agree = [(t[i], w) for t, w in zip(trimmed, weights) if t[i] != 0 and ((t[i] > 0) - (t[i] < 0)) == sign]
        out.append(sum(v for v, _ in agree) / sum(w for _, w in agree) if agree and sign else 0.0)
    return base.double() + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_elementwise_reference(density):
    states, base = make_family(3)
    weights = [0.5, 1.0, 1.5]
    out = ties(states, weights, base, density=density)
    w = [x / 3.0 for x in weights]
    for k in float_keys(out):
        assert_close(out[k], ties64([s[k] for s in states], base[k], w, density), 1e-5, k)


def test_ties_rejects_bad_density_and_negative_weights():
    states, base = make_family(3)
    with pytest.raises(ValueError, match="density"):
        ties(states, None, base, density=0.0)
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        ties(states, [-1, 1, 1], base)


# ---------------------------------------------------------------- DARE

def test_dare_single_model_drops_and_rescales_exactly():
    base = {"x": torch.zeros(4000)}
    tau = torch.randn(4000)
    out = dare([{"x": tau}], None, base, drop_rate=0.75, seed=5)["x"]
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] * 4.0)
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_dare_reproducible_per_seed_and_independent_of_key_order():
    states, base = make_family(3)
    a = dare(states, None, base, drop_rate=0.5, seed=11)
    b = dare(states, None, base, drop_rate=0.5, seed=11)
    c = dare(states, None, base, drop_rate=0.5, seed=12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in float_keys(a))
    reordered = [dict(reversed(list(s.items()))) for s in states]
    d = dare(reordered, None, dict(reversed(list(base.items()))), drop_rate=0.5, seed=11)
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_dare_expectation_is_the_task_vector_merge():
    states, base = make_family(3)
    weights = [1.0, 2.0, 1.0]
    target = linear(states, weights)
    runs = [dare(states, weights, base, drop_rate=0.5, seed=s) for s in range(300)]
    for k in ("embed.weight", "blocks.1.w"):
        mean = torch.stack([r[k].double() for r in runs]).mean(0)
        tv = target[k].double() - base[k].double()
        rel = ((mean - target[k].double()).norm() / tv.norm()).item()
        assert rel < 0.08, (k, rel)


def test_dare_without_drop_is_linear_and_ties_combine():
    states, base = make_family(3)
    out = dare(states, [1, 2, 3], base, drop_rate=0.0)
    ref = linear(states, [1, 2, 3])
    for k in float_keys(out):
        assert_close(out[k], ref[k], 1e-5, k)
    out_t = dare(states, [1, 2, 3], base, drop_rate=0.0, combine="ties", density=0.4)
    ref_t = ties(states, [1, 2, 3], base, density=0.4)
    for k in float_keys(out_t):
        assert_close(out_t[k], ref_t[k], 1e-5, k)
    with pytest.raises(ValueError, match="combine"):
        dare(states, None, base, combine="mean")
    with pytest.raises(ValueError, match="drop_rate"):
        dare(states, None, base, drop_rate=1.0)


# ---------------------------------------------------------------- FrankenMerge and DFS

def test_frankenmerge_picks_exact_tensors():
    states, _ = make_family(3)
    child = frankenmerge(states, [2, 0])
    for k in states[0]:
        i = block_index(k)
        if i is not None:
            assert torch.equal(child[k], states[[2, 0][i]][k]), k
    ref = linear(states)
    for k in ("embed.weight", "norm.weight", "head.weight"):
        assert torch.equal(child[k], ref[k])
    parent = frankenmerge(states, [1, 1], rest_weights=[0, 0, 1])
    assert torch.equal(parent["head.weight"], states[2]["head.weight"])
    child["blocks.0.w"].add_(1.0)            # a copy, not a view of the parent
    assert not torch.equal(child["blocks.0.w"], states[2]["blocks.0.w"])
    with pytest.raises(ValueError, match="one model index per layer"):
        frankenmerge(states, [0, 1, 2])
    with pytest.raises(ValueError, match="layer_sources\\[1\\]"):
        frankenmerge(states, [0, 3])


def test_dfs_changes_depth_and_renames_layers():
    states, _ = make_family(2)
    child, n_layers = dfs(states, [(1, 1), (0, 0), (0, 1)])
    assert n_layers == 3 and count_layers(child) == 3
    assert torch.equal(child["blocks.0.w"], states[1]["blocks.1.w"])
    assert torch.equal(child["blocks.1.s"], states[0]["blocks.0.s"])
    assert torch.equal(child["blocks.2.b"], states[0]["blocks.1.b"])
    short, depth = dfs(states, [(1, 0)])
    assert depth == 1 and sorted(k for k in short if block_index(k) is not None) == \
        ["blocks.0.b", "blocks.0.s", "blocks.0.w"]
    with pytest.raises(ValueError, match="path\\[1\\]"):
        dfs(states, [(0, 0), (0, 2)])
    with pytest.raises(ValueError, match="path\\[0\\]"):
        dfs(states, [(2, 0)])
    with pytest.raises(ValueError, match="non-empty"):
        dfs(states, [])
    with pytest.raises(ValueError, match="must agree"):
        dfs(states, [(0, 1), (0, 0)], rename_fn=lambda name, i: name)


def test_dfs_child_loads_into_a_deeper_transformer():
    config = TransformerConfig(vocab_size=17, dim=16, n_layers=2, n_heads=2, max_len=8)
    torch.manual_seed(0)
    states = [Transformer(config).state_dict() for _ in range(2)]
    child, n_layers = dfs(states, [(0, 0), (1, 0), (1, 1), (0, 1)])
    model = Transformer(TransformerConfig.from_dict({**config.to_dict(), "n_layers": n_layers}))
    model.load_state_dict(child)              # strict: every key present and no extra
    assert model.config.n_layers == 4
    assert model(torch.randint(0, 17, (2, 5))).shape == (2, 5, 17)


def test_layer_naming_helpers():
    assert block_index("blocks.12.attn.q_proj.weight") == 12
    assert block_index("model.blocks.3.x") == 3
    assert block_index("embed.weight") is None and block_index("myblocks.1.x") is None
    assert rename_block("model.blocks.3.mlp.w", 7) == "model.blocks.7.mlp.w"
    with pytest.raises(ValueError, match="not 0..1"):
        count_layers({"blocks.0.w": torch.zeros(1), "blocks.2.w": torch.zeros(1)})


# ---------------------------------------------------------------- recipes

def test_recipe_json_round_trip_and_canonical_key():
    r = Recipe("dfs", {"path": [(0, 1), (1, 0)], "weights": [0.1 + 0.2, 0.7]})
    again = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and again.key() == r.key() and hash(again) == hash(r)
    assert Recipe("dfs", {"path": [[0, 1], [1, 0]], "weights": [0.3, 0.7]}).key() == r.key()
    assert Recipe("linear", {"weights": [0.3, 0.7]}) != Recipe("slerp", {"weights": [0.3, 0.7]})
    with pytest.raises(ValueError, match="one of"):
        Recipe("average", {})
    with pytest.raises(ValueError, match="unknown keys \\['density'\\]"):
        Recipe("linear", {"density": 0.5})
    with pytest.raises(ValueError, match="operator"):
        Recipe.from_dict({"params": {}})


def test_apply_recipe_equals_direct_calls():
    states, base = make_family(3)
    checks = [
        (Recipe("linear", {"weights": [1, 2, 3]}), linear(states, [1, 2, 3])),
        (Recipe("slerp", {}), slerp_many(states)),
        (Recipe("ties", {"density": 0.3}), ties(states, None, base, density=0.3)),
        (Recipe("dare", {"drop_rate": 0.2, "seed": 4, "combine": "ties"}),
         dare(states, None, base, drop_rate=0.2, seed=4, combine="ties")),
        (Recipe("frankenmerge", {"layer_sources": [1, 2], "weights": [1, 0, 0]}),
         frankenmerge(states, [1, 2], rest_weights=[1, 0, 0])),
    ]
    for recipe, expected in checks:
        out, n_layers = apply_recipe(recipe, states, base)
        assert n_layers == 2
        assert all(torch.equal(out[k], expected[k]) for k in expected), recipe.operator
    with pytest.raises(ValueError, match="needs params\\['path'\\]"):
        apply_recipe(Recipe("dfs", {}), states, base)
    with pytest.raises(TypeError, match="Recipe"):
        apply_recipe({"operator": "linear"}, states, base)
