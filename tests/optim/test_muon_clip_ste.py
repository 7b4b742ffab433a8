"""MuonClip through the optimizer, and STE mode on a BitNet-style model."""
import pytest
import torch
from torch import nn

from forge.nn import CausalSelfAttention
from forge.optim import MuonGrokfast, muon_param_groups


def test_qk_clip_after_a_step_caps_the_same_batch_logits():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4)
    with torch.no_grad():  # heads 1 and 3 produce huge logits
        for head in (1, 3):
            for rows in attn.qk_head_slices(head)[:2]:
                rows.mul_(25.0)
    x = torch.randn(4, 9, 32)
    opt = MuonGrokfast(muon_param_groups(attn), lr=1e-4, adamw_lr=1e-4, qk_clip_threshold=10.0)
    opt.register_attention(attn)
    attn(x).square().mean().backward()
    before = attn.max_logits.clone()
    assert before[1] > 10 and before[3] > 10 and before[0] < 10 and before[2] < 10
    opt.step()
    assert opt.get_qk_clip_count() == 2
    with torch.no_grad():
        attn(x)
    after = attn.max_logits
    assert after[1] <= 10.0 * 1.01 and after[3] <= 10.0 * 1.01  # lr 1e-4 moves the weights a little too
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=2e-2, atol=2e-2)
    opt.reset_qk_clip_count()
    assert opt.get_qk_clip_count() == 0


def test_register_attention_needs_attention_modules():
    opt = MuonGrokfast(nn.Linear(4, 4).parameters(), qk_clip_threshold=5.0)
    with pytest.raises(ValueError, match="CausalSelfAttention"):
        opt.register_attention(nn.Linear(4, 4))


class TernarySTELinear(nn.Module):
    """BitNet b1.58's weight path (Ma et al. 2024): absmean ternary weights in the forward, the
    straight-through identity in the backward, full-precision latent weights as the parameter."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)

    def forward(self, x):
        scale = self.weight.abs().mean().clamp_min(1e-5)
        ternary = (self.weight / scale).round().clamp(-1, 1) * scale
        return x @ (self.weight + (ternary - self.weight).detach()).T


def test_ste_mode_trains_latent_weights_of_a_ternary_model():
    torch.manual_seed(0)
    model = nn.Sequential(TernarySTELinear(16, 64), nn.ReLU(), TernarySTELinear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = (x[:, :4] * 2 + x[:, 4:8]).detach()
    opt = MuonGrokfast(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, ste_mode=True, grokfast_lamb=0.3)
    latent_before = model[2].weight.detach().clone()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert not torch.equal(model[2].weight, latent_before)  # the latent (float) weights moved
    assert model[2].weight.dtype == torch.float32


def test_ste_mode_refuses_integer_weights():
    model = nn.Linear(4, 4)
    opt = MuonGrokfast([{"params": [model.weight], "use_muon": True}], ste_mode=True)
    model.weight.grad = torch.ones_like(model.weight)
    packed = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    packed.grad = torch.zeros(4, 4, dtype=torch.int8)
    opt.param_groups[0]["params"].append(packed)
    with pytest.raises(TypeError, match="latent"):
        opt.step()
