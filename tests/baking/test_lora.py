"""peft LoRA on forge's Transformer: real peft, real module names, merge back to a plain model."""
import math

import peft
import pytest
import torch

from forge.baking import DEFAULT_TARGET_MODULES, interpolate, lora_config, merge_lora, wrap_lora
from forge.baking.lora import lora_parameters
from forge.nn import Transformer, build_model

CONFIG = dict(vocab_size=19, dim=24, n_layers=2, n_heads=2, max_len=16)


def small(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return build_model(CONFIG).eval()


def randomize_adapters(wrapped, seed=1):
    """LoRA starts with B = 0 (a no-op); give every adapter nonzero weights so merges have work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(wrapped):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_wrap_targets_every_projection_and_starts_at_the_original():
    model = small()
    wrapped = wrap_lora(model, rank=3, alpha=6)
    assert isinstance(wrapped, peft.PeftModel)
    adapted = {name.rsplit(".", 1)[0] for name, _ in wrapped.named_parameters() if "lora_A" in name}
    for i in range(CONFIG["n_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(f"blocks.{i}.attn.{proj}" in name for name in adapted)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert any(f"blocks.{i}.mlp.{proj}" in name for name in adapted)
    assert len(adapted) == CONFIG["n_layers"] * len(DEFAULT_TARGET_MODULES)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    tokens = torch.randint(0, 19, (3, 7))
    torch.testing.assert_close(wrapped(tokens), model(tokens), rtol=0, atol=0)  # B = 0


def test_wrap_copies_so_the_original_never_changes():
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = wrap_lora(model, rank=2, alpha=2)
    randomize_adapters(wrapped)
    merge_lora(wrapped)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_disable_adapter_gives_the_original_outputs():
    model = small()
    wrapped = wrap_lora(model, rank=4, alpha=8)
    randomize_adapters(wrapped)
    tokens = torch.randint(0, 19, (2, 9))
    assert (wrapped(tokens) - model(tokens)).abs().max() > 1e-3
    with wrapped.disable_adapter():
        torch.testing.assert_close(wrapped(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("targets", [DEFAULT_TARGET_MODULES, ("q_proj", "v_proj"), ("down_proj", "head")])
def test_merge_and_unload_gives_a_plain_model_with_the_lora_outputs(targets):
    model = small()
    wrapped = wrap_lora(model, rank=3, alpha=5, target_modules=targets)
    randomize_adapters(wrapped)
    tokens = torch.randint(0, 19, (4, 11))
    with torch.no_grad():
        expected = wrapped(tokens)
    merged = merge_lora(wrapped)
    assert type(merged) is Transformer
    assert list(merged.state_dict()) == list(model.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        got = merged(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - model(tokens)).abs().max() > 1e-3  # the adapters really were merged in


def test_merged_weight_is_w_plus_scaled_b_a_in_float64():
    """W' = W + (alpha / r) B A (Hu et al. 2021, eq. 3), checked on one projection in float64."""
    model = small()
    rank, alpha = 3, 7.0
    wrapped = wrap_lora(model, rank=rank, alpha=alpha, target_modules=("up_proj",))
    randomize_adapters(wrapped)
    layer = wrapped.base_model.model.blocks[1].mlp.up_proj
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = model.blocks[1].mlp.up_proj.weight.double() + alpha / rank * b @ a
    merged = merge_lora(wrapped)
    torch.testing.assert_close(merged.blocks[1].mlp.up_proj.weight.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(rank=2.5), "rank"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=math.nan), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(target_modules=("w_q",)), "w_q"), (dict(target_modules=()), "target_modules"),
])
def test_bad_lora_settings_raise_naming_the_field(kwargs, field):
    args = dict(rank=2, alpha=4.0) | kwargs
    with pytest.raises(ValueError, match=field):
        lora_config(**args)
    with pytest.raises(ValueError, match=field):
        wrap_lora(small(), **args)


def test_wrap_and_merge_reject_other_types():
    with pytest.raises(TypeError, match="Transformer"):
        wrap_lora(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="PeftModel"):
        merge_lora(small())


def test_interpolate_endpoints_are_exact_and_the_middle_is_linear():
    original, other = small(0), small(1)
    tokens = torch.randint(0, 19, (2, 5))
    zero, one = interpolate(original, other, 0.0), interpolate(original, other, 1.0)
    for name, value in original.state_dict().items():
        assert torch.equal(zero.state_dict()[name], value)
        assert torch.equal(one.state_dict()[name], other.state_dict()[name])
    quarter = interpolate(original, other, 0.25)
    for name, value in quarter.state_dict().items():
        expected = 0.75 * original.state_dict()[name].double() + 0.25 * other.state_dict()[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert type(quarter) is Transformer and quarter is not original
    torch.testing.assert_close(zero(tokens), original(tokens), rtol=0, atol=0)


def test_interpolate_rejects_mismatches():
    original = small()
    with pytest.raises(ValueError, match="strength"):
        interpolate(original, small(1), math.inf)
    with pytest.raises(ValueError, match="different parameters"):
        interpolate(original, torch.nn.Linear(2, 2), 0.5)
    wider = build_model(CONFIG | dict(dim=32))
    with pytest.raises(ValueError, match="shape"):
        interpolate(original, wider, 0.5)
