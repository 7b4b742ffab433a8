"""The original system's MuGrokConfig presets and helpers, and the KL regularizer."""
import copy

import pytest
import torch
from torch import nn

from forge.nn import CausalSelfAttention, KLRegularizer
from forge.ops.kl_div import kl_div_logits_reference
from forge.optim import MuGrokConfig, MuonGrokfast, create_optimizer_from_phase


@pytest.mark.parametrize("phase, lr, lamb, clip, kl, ste", [
    (1, 1e-3, 0.3, 30.0, 0.0, False), (3, 5e-4, 0.1, 25.0, 0.1, False), (5, 1e-3, 2.0, 30.0, 0.0, True),
    (6, 1e-4, 0.2, 30.0, 0.0, False), (7, 5e-4, 0.15, 28.0, 0.05, False)])
def test_seed_presets(phase, lr, lamb, clip, kl, ste):
    c = MuGrokConfig.from_phase(phase)
    assert (c.muon_lr, c.grokfast_lambda, c.qk_clip_threshold, c.kl_coefficient, c.muon_ste_mode) == (lr, lamb, clip, kl, ste)
    assert (c.grokfast_alpha, c.momentum, c.nesterov, c.ns_steps, c.weight_decay) == (0.98, 0.95, True, 5, 0.0)


@pytest.mark.parametrize("phase", [0, 2, 4, 8, "1"])
def test_unknown_preset(phase):
    with pytest.raises(ValueError, match="presets exist for phases"):
        MuGrokConfig.from_phase(phase)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.attn = CausalSelfAttention(16, 2)
        self.head = nn.Linear(16, 10, bias=False)

    def forward(self, tokens):
        return self.head(self.attn(self.embed(tokens)))


def test_create_optimizer_from_phase_wires_everything():
    model = Tiny()
    opt = create_optimizer_from_phase(model, 3)
    assert isinstance(opt, MuonGrokfast) and opt.qk_clip_threshold == 25.0
    assert MuGrokConfig.from_phase(3).kl_coefficient == 0.1 and not hasattr(opt, "kl_coefficient")
    muon = next(g for g in opt.param_groups if g["use_muon"])
    adamw = next(g for g in opt.param_groups if not g["use_muon"])
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and muon["lr"] == 5e-4 and adamw["lr"] == 5e-4
    assert "embed.weight" in adamw["param_names"] and "head.weight" in adamw["param_names"]
    assert opt._attention_modules == [model.attn]
    tokens = torch.randint(0, 10, (2, 5))
    model(tokens).sum().backward()
    opt.step()
    assert opt.get_muon_lr() == 5e-4 and opt.get_mu_norm() > 0 and opt.get_qk_clip_count() == 0


def test_phase_defaults_are_the_preset_kwargs_plus_kl_coefficient():
    flat = MuGrokConfig.phase_defaults(7)
    assert flat == dict(MuGrokConfig.from_phase(7).to_kwargs(), kl_coefficient=0.05)
    assert flat["grokfast_lamb"] == 0.15 and "grokfast_lambda" not in flat
    MuonGrokfast(nn.Linear(3, 3).parameters(), **{k: v for k, v in flat.items() if k != "kl_coefficient"})


def test_match_rms_adamw_update_rms_is_about_adamw_scale():
    """Moonlight's 0.2 sqrt(max(A, B)) makes Muon's update RMS about 0.2 * lr, like AdamW's."""
    layer = nn.Linear(256, 128, bias=False)
    opt = MuonGrokfast(layer.parameters(), lr=1e-3, adjust_lr_fn="match_rms_adamw", grokfast=None, momentum=0.0,
                       nesterov=False)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    rms = (layer.weight - before).pow(2).mean().sqrt().item()
    assert 0.1e-3 < rms < 0.3e-3


def test_kl_regularizer_pulls_towards_the_reference():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 5))
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.add_(torch.randn_like(model[0].weight))
    reg = KLRegularizer(reference, coefficient=0.5)
    x = torch.randn(32, 6)
    first = reg(x, model(x)).item()
    expected = 0.5 * nn.functional.kl_div(model(x).log_softmax(-1), reference(x).log_softmax(-1),
                                          log_target=True, reduction="batchmean").item()
    assert first == pytest.approx(expected, rel=1e-5) and first > 0
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        reg(x, model(x)).backward()
        opt.step()
    assert reg(x, model(x)).item() < 0.1 * first
    assert all(p.grad is None for p in reference.parameters())  # the reference is never trained


def test_kl_reference_is_zero_for_equal_logits_and_checks_input():
    logits = torch.randn(3, 4, 7)
    assert kl_div_logits_reference(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="coefficient"):
        KLRegularizer(nn.Linear(2, 2), -1.0)
    reg = KLRegularizer(nn.Linear(2, 3), 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        reg(torch.randn(4, 2), torch.randn(4, 5))
