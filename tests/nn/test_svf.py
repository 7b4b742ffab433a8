"""SVF (Transformer² singular value fine-tuning): W' == W at init, only p gets gradients, W' matches its float64
formula, folding keeps the outputs, an expert file round-trips, mixtures are per-layer sums."""
import pytest
import torch
from torch import nn

from forge.nn import SVFLinear, add_svf, build_model, fold_svf, load_expert, save_expert
from forge.nn.svf import (expert_of, identity_expert, lora_parameter_count, mix_experts, set_expert,
                          svf_parameter_count)

SHAPES = [(1, 7), (7, 1), (5, 9), (9, 5), (13, 13), (3, 64)]


def _linear(out_f, in_f, bias, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(layer.weight, std=0.5)
    return layer


def _reference_weight(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The paper's formula in float64: U diag(s ⊙ z) Vᵀ · Σs / Σ(s ⊙ z), z padded with ones past the top k."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    full = torch.cat([z.double(), torch.ones(s.numel() - z.numel(), dtype=torch.float64)])
    return (u * (s * full)) @ vh * (s.sum() / (s * full).sum())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 4, 100])
def test_svf_equals_the_base_layer_at_init_and_its_formula_after_a_change(shape, k):
    base = _linear(*shape, bias=True, seed=k)
    layer = SVFLinear(base, k)
    x = torch.randn(6, shape[1])
    assert torch.equal(layer.adapted_weight(), base.weight.detach())
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.p.copy_(torch.randn(layer.k))
    z = torch.sigmoid(layer.p.detach().double()) * 2
    torch.testing.assert_close(layer.adapted_weight().double(), _reference_weight(base.weight.detach(), z),
                               rtol=1e-5, atol=1e-5)
    assert layer.k == min(k, *shape)


def test_gradient_reaches_p_and_only_p():
    model = add_svf(build_model({"vocab_size": 20, "dim": 16, "n_layers": 2, "n_heads": 2, "max_len": 8}), 3)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".p") for name in trainable) and len(trainable) == 6
    with torch.no_grad():        # away from z = 1, so every p has a non-trivial gradient
        for layer in model.modules():
            if isinstance(layer, SVFLinear):
                layer.p.normal_()
    model(torch.randint(0, 20, (3, 8))).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if name.endswith(".p"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_folding_gives_the_same_outputs_and_a_plain_model():
    torch.manual_seed(0)
    plain = build_model({"vocab_size": 20, "dim": 16, "n_layers": 2, "n_heads": 2, "max_len": 8})
    model = add_svf(plain, 4)
    expert = {name: torch.rand(4) * 1.8 + 0.1 for name in expert_of(model)}
    set_expert(model, expert)
    tokens = torch.randint(0, 20, (3, 8))
    folded = fold_svf(model)
    assert not any(isinstance(m, SVFLinear) for m in folded.modules())
    assert set(folded.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(folded(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded(tokens), plain(tokens), atol=1e-3)     # the expert changed the model
    torch.testing.assert_close(fold_svf(model, identity_expert(model))(tokens), plain(tokens), rtol=0, atol=0)


def test_an_expert_file_round_trips(tmp_path):
    model = add_svf(build_model({"vocab_size": 20, "dim": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}), 5)
    expert = {name: torch.rand(5) for name in expert_of(model)}
    path = save_expert(tmp_path / "e.safetensors", expert, {"name": "addition", "tasks": ["addition"]})
    loaded, meta = load_expert(path)
    assert meta == {"name": "addition", "tasks": ["addition"]} and set(loaded) == set(expert)
    for name in expert:
        assert torch.equal(loaded[name], expert[name])
    set_expert(model, loaded)
    assert all(torch.equal(z, expert[n]) for n, z in expert_of(model).items())
    with pytest.raises(ValueError, match="shape"):
        set_expert(model, {n: torch.ones(4) for n in expert})
    with pytest.raises(ValueError, match="missing"):
        set_expert(model, {})


def test_mixtures_parameter_counts_and_bad_settings():
    model = add_svf(build_model({"vocab_size": 20, "dim": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}), 5)
    a, b = {n: torch.full((5,), 2.0) for n in expert_of(model)}, {n: torch.ones(5) for n in expert_of(model)}
    mixed = mix_experts([a, b], [0.25, 0.5])          # 1 + 0.25 (2 - 1) + 0.5 (1 - 1)
    assert all(torch.allclose(z, torch.full((5,), 1.25)) for z in mixed.values())
    assert all(torch.allclose(z, torch.full((5,), 1.5)) for z in mix_experts([a, b], [0.5, 0.5]).values())
    per_layer = mix_experts([a, b], {n: [1.0, 0.0] for n in a})
    assert all(torch.equal(z, a[n]) for n, z in per_layer.items())
    assert svf_parameter_count(model) == 15                     # three MLP matrices, top 5 values each
    hidden = model.config.hidden
    assert lora_parameter_count(model, 8) == 8 * 3 * (16 + hidden)
    with pytest.raises(ValueError, match="svf_singular_values"):
        SVFLinear(nn.Linear(3, 3), 0)
    with pytest.raises(ValueError, match="max_mult"):
        SVFLinear(nn.Linear(3, 3), 2, max_mult=1.0)
