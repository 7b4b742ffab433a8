"""qk_clip_: heads over the threshold land exactly on it, heads under it are left bit-identical."""
import math

import pytest
import torch

from forge.nn import CausalSelfAttention
from forge.optim import MuonGrokfast
from forge.optim.qk_clip import qk_clip_, qk_logit_recorders, records_qk_logits

TAU = 5.0
HOT_HEADS = (0, 2)


def hot_module(rotary: bool, dtype=torch.float64) -> CausalSelfAttention:
    """dim 24, 4 heads; the q and k rows of heads 0 and 2 scaled by 30 (their logits by 900)."""
    module = CausalSelfAttention(24, 4, bias=True, rotary=rotary).to(dtype)
    with torch.no_grad():
        for head in HOT_HEADS:
            for rows in module.qk_head_slices(head):
                rows.mul_(30.0)
    return module


def head_scores(module, x):
    """Masked pre-softmax scores (batch, heads, seq, seq), from the module's own projections."""
    q, k, _ = module.qkv_heads(x)
    scores = q @ k.transpose(-2, -1) / math.sqrt(module.head_dim)
    return scores.masked_fill(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), -math.inf)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_clipped_heads_land_on_threshold(rotary, dtype):
    module = hot_module(rotary, dtype)
    x = torch.randn(3, 7, 24, dtype=dtype)
    module(x)
    before = module.max_logits.clone()
    cold = [h for h in range(4) if h not in HOT_HEADS]
    assert all(before[h] > TAU for h in HOT_HEADS) and all(before[h] < TAU for h in cold)
    untouched = {h: [t.clone() for t in module.qk_head_slices(h)] for h in cold}
    v_o = [p.clone() for p in (*module.v_proj.parameters(), *module.o_proj.parameters())]

    assert qk_clip_(module, TAU) == len(HOT_HEADS)
    module(x)
    for h in HOT_HEADS:
        assert module.max_logits[h] <= TAU * (1 + 1e-5)
        assert module.max_logits[h] >= TAU * (1 - 1e-5)
    for h in cold:
        assert module.max_logits[h] == before[h]
        assert all(torch.equal(a, b) for a, b in zip(module.qk_head_slices(h), untouched[h]))
    assert all(torch.equal(a, b) for a, b in zip((*module.v_proj.parameters(), *module.o_proj.parameters()), v_o))


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rope"])
def test_every_logit_of_a_clipped_head_scales_by_tau_over_max(rotary):
    module = hot_module(rotary)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    scores_before = head_scores(module, x)
    module(x)
    gamma = (TAU / module.max_logits.double()).clamp(max=1.0)
    qk_clip_(module, TAU)
    expected = scores_before * gamma[None, :, None, None]
    torch.testing.assert_close(head_scores(module, x), expected, rtol=1e-12, atol=1e-12)


def test_nothing_clipped_before_first_forward_or_under_threshold():
    module = hot_module(False)
    snapshot = [p.clone() for p in module.parameters()]
    assert qk_clip_(module, TAU) == 0  # max_logits still -inf
    module(torch.randn(2, 4, 24, dtype=torch.float64))
    assert qk_clip_(module, 1e9) == 0
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), snapshot))


def test_non_finite_records_are_skipped():
    module = hot_module(False)
    snapshot = [p.clone() for p in module.parameters()]
    module.max_logits.copy_(torch.tensor([math.inf, math.nan, -math.inf, 1.0]))
    assert qk_clip_(module, TAU) == 0
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), snapshot))


def test_clip_keeps_parameters_trainable():
    module = hot_module(True, torch.float32)
    x = torch.randn(2, 5, 24)
    module(x)
    qk_clip_(module, TAU)
    assert all(p.requires_grad and p.grad is None for p in module.parameters())
    module(x).sum().backward()
    assert module.q_proj.weight.grad is not None


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_threshold_raises_value_error(bad):
    with pytest.raises(ValueError, match="threshold"):
        qk_clip_(CausalSelfAttention(8, 2), bad)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="threshold"):
        qk_clip_(CausalSelfAttention(8, 2), "5")
    with pytest.raises(TypeError, match="module"):
        qk_clip_(torch.nn.Linear(8, 8), 5.0)


class SingleHeadScorer(torch.nn.Module):
    """Not forge's attention: a one-head bilinear scorer implementing the QKLogitRecorder protocol."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
        self.register_buffer("max_logits", torch.full((1,), -math.inf), persistent=False)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        self.max_logits.copy_(scores.detach().amax().reshape(1))
        return scores

    def qk_head_slices(self, head):
        return [self.q.weight.detach(), self.k.weight.detach()]


def test_any_module_implementing_the_protocol_is_clipped_and_registered():
    torch.manual_seed(0)
    scorer = SingleHeadScorer()
    model = torch.nn.Sequential(scorer, torch.nn.Linear(4, 4))
    assert records_qk_logits(scorer) and not records_qk_logits(model[1])
    assert qk_logit_recorders(model) == [scorer]
    x = 10 * torch.randn(6, 4)
    assert scorer(x).max() > TAU
    assert qk_clip_(scorer, TAU) == 1
    scorer(x)
    assert scorer.max_logits.item() == pytest.approx(TAU, rel=1e-5)
    opt = MuonGrokfast(model.parameters(), qk_clip_threshold=TAU)
    opt.register_attention(model)
    assert opt._attention_modules == [scorer]
