"""CausalSelfAttention: output against fused SDPA, RoPE against a complex-number reference, and the
recorded per-head max logit against a brute-force loop over the unmasked scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from forge.nn import CausalSelfAttention, apply_rotary


def reference_heads(module, x):
    """q, k, v (batch, heads, seq, head_dim) straight from the Linear weights, RoPE applied."""
    batch, seq, dim = x.shape

    def project(lin):
        y = x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        return y.view(batch, seq, module.n_heads, module.head_dim).transpose(1, 2)

    q, k, v = project(module.q_proj), project(module.k_proj), project(module.v_proj)
    if module.rotary:
        q, k = apply_rotary(q), apply_rotary(k)
    return q, k, v


def brute_force_max_logits(module, x):
    """Per head: max over batch b, query i and key j <= i of q_bi . k_bj / sqrt(head_dim), in loops."""
    with torch.no_grad():
        q, k, _ = reference_heads(module, x.double())
    batch, heads, seq, head_dim = q.shape
    best = [-math.inf] * heads
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                for j in range(i + 1):
                    best[h] = max(best[h], float(q[b, h, i] @ k[b, h, j]) / math.sqrt(head_dim))
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_output_matches_sdpa(rotary, bias):
    module = CausalSelfAttention(24, 4, bias=bias, rotary=rotary).double()
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    q, k, v = reference_heads(module, x)
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = module.o_proj(attended.transpose(1, 2).reshape(3, 7, 24))
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)


def test_float32_output_close_to_sdpa():
    module = CausalSelfAttention(32, 2, rotary=True)
    x = torch.randn(2, 9, 32)
    q, k, v = reference_heads(module, x)
    expected = module.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


def test_rotary_matches_complex_rotation():
    """RoFormer's complex form: pair (x_2i, x_2i+1) as x_2i + i x_2i+1, times exp(i m theta_i)."""
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.arange(5, dtype=torch.float64)[:, None] * theta
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rotary(x), expected, rtol=1e-13, atol=1e-13)


def _rotary_written_out(x: torch.Tensor, offset=0) -> torch.Tensor:
    """RoFormer eq. 34 in real arithmetic, float64."""
    seq, head_dim = x.shape[-2], x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if isinstance(offset, torch.Tensor):
        angles = offset.double()[:, None, :, None] * theta
    else:
        angles = torch.arange(offset, offset + seq, dtype=torch.float64)[:, None] * theta
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 5, 9)[..., :8],                       # odd strides
    lambda: torch.randn(3, 7, 2, 6).transpose(1, 2),             # the projections' (batch, heads, seq, head_dim)
    lambda: torch.randn(1, 2, 11, 10)[..., 1:9],                  # an odd offset into the storage
    lambda: torch.randn(4, 1, 1, 2),                             # 1 x n, one pair
], ids=["odd-strides", "transposed", "offset", "one-pair"])
def test_rotary_on_any_layout_matches_the_written_out_form(make):
    x = make()
    torch.testing.assert_close(apply_rotary(x), _rotary_written_out(x).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(x.double(), offset=3), _rotary_written_out(x, offset=3), rtol=1e-13,
                               atol=1e-13)


def test_rotary_with_per_row_positions_and_its_gradient():
    x = torch.randn(3, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(apply_rotary(x, offset=positions), _rotary_written_out(x, positions), rtol=1e-13,
                               atol=1e-13)
    torch.autograd.gradcheck(lambda t: apply_rotary(t, offset=positions), (x,))


def test_rotary_compiled_is_the_same_function():
    """apply_rotary compiles in one graph (fullgraph) to the same function."""
    x = torch.randn(2, 3, 7, 12)
    compiled = torch.compile(apply_rotary, fullgraph=True)
    torch.testing.assert_close(compiled(x, offset=5), apply_rotary(x, offset=5), rtol=1e-6, atol=1e-6)


def test_rotary_logits_depend_on_relative_position_only():
    """<R_m q, R_n k> = <R_(m+s) q, R_(n+s) k>: place the same q, k at positions (1, 4) and (3, 6)."""
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    seq = torch.zeros(7, 8, dtype=torch.float64)
    first, second = seq.clone(), seq.clone()
    first[1], first[4], second[3], second[6] = q, k, q, k
    a, b = apply_rotary(first), apply_rotary(second)
    assert torch.isclose(a[1] @ a[4], b[3] @ b[6], rtol=1e-12)
    torch.testing.assert_close(a.norm(dim=-1), first.norm(dim=-1))


def test_rotary_position_zero_is_identity_and_dtype_kept():
    x = torch.randn(1, 4, 6, dtype=torch.bfloat16)
    out = apply_rotary(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="head_dim"):
        apply_rotary(torch.randn(3, 5))


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("shape", [(3, 7, 24, 4), (2, 5, 18, 3), (1, 1, 8, 2), (4, 11, 12, 6)])
def test_max_logits_match_brute_force(shape, rotary):
    batch, seq, dim, heads = shape
    module = CausalSelfAttention(dim, heads, bias=True, rotary=rotary).double()
    x = torch.randn(batch, seq, dim, dtype=torch.float64)
    module(x)
    assert module.max_logits.shape == (heads,) and module.max_logits.dtype == torch.float32
    expected = brute_force_max_logits(module, x)
    torch.testing.assert_close(module.max_logits.double(), expected.float().double())


def test_max_logits_ignore_future_keys():
    """Token 0 has a large query but no key, token 1 a large key but no query: the only large logit is
    query 0 against key 1, which is in the future and masked, so every recorded max is 0."""
    module = CausalSelfAttention(4, 1).double()
    with torch.no_grad():
        module.q_proj.weight.zero_()[0, 0] = 1.0  # q = (x_0, 0, 0, 0)
        module.k_proj.weight.zero_()[0, 1] = 1.0  # k = (x_1, 0, 0, 0)
    x = torch.zeros(1, 2, 4, dtype=torch.float64)
    x[0, 0, 0], x[0, 1, 1] = 10.0, 10.0
    q, k, _ = reference_heads(module, x)
    assert (q[0, 0, 0] @ k[0, 0, 1]) / 2 == 50.0  # the masked logit would dominate
    module(x)
    assert module.max_logits.tolist() == [0.0]
    assert brute_force_max_logits(module, x).tolist() == [0.0]


def test_max_logits_recorded_in_eval_no_grad_and_inference_mode():
    module = CausalSelfAttention(16, 2).eval()
    assert torch.all(module.max_logits == -math.inf)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        module(x)
    first = module.max_logits.clone()
    assert torch.isfinite(first).all()
    with torch.inference_mode():
        module(2 * x)
    torch.testing.assert_close(module.max_logits, 4 * first)  # logits are quadratic in x without bias


def test_max_logits_stay_float32_after_dtype_conversion():
    module = CausalSelfAttention(16, 4).to(torch.bfloat16)
    module(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert module.max_logits.dtype == torch.float32 and torch.isfinite(module.max_logits).all()


def test_max_logits_not_in_state_dict():
    module = CausalSelfAttention(8, 2)
    assert "max_logits" not in module.state_dict()
    assert "max_logits" in dict(module.named_buffers())


def test_gradients_reach_every_projection():
    module = CausalSelfAttention(24, 4, bias=True, rotary=True)
    x = torch.randn(3, 7, 24, requires_grad=True)
    module(x).square().sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(module, name)
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0, name
        assert lin.bias.grad is not None and torch.isfinite(lin.bias.grad).all(), name
    assert x.grad.abs().sum() > 0
    assert not module.max_logits.requires_grad


def test_qk_head_slices_are_views_of_the_head_rows():
    module = CausalSelfAttention(12, 3, bias=True)
    slices = module.qk_head_slices(1)
    assert len(slices) == 4
    torch.testing.assert_close(slices[0], module.q_proj.weight[4:8].detach())
    torch.testing.assert_close(slices[3], module.k_proj.bias[4:8].detach())
    with torch.no_grad():
        slices[1].fill_(7.0)
    assert torch.all(module.k_proj.weight[4:8] == 7.0) and not torch.any(module.k_proj.weight[:4] == 7.0)
    assert len(CausalSelfAttention(12, 3).qk_head_slices(0)) == 2
    for bad in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match="head"):
            module.qk_head_slices(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_heads"):
        CausalSelfAttention(10, 3)
    with pytest.raises(ValueError, match="dim"):
        CausalSelfAttention(0, 1)
    with pytest.raises(ValueError, match="n_heads"):
        CausalSelfAttention(8, 0)
    with pytest.raises(ValueError, match="rotary"):
        CausalSelfAttention(9, 3, rotary=True)
    module = CausalSelfAttention(8, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        module(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="x must have shape"):
        module(torch.randn(3, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module([[1.0] * 8])


@pytest.mark.parametrize("seq,past", [(1, 0), (7, 0), (1, 6), (3, 4)])
def test_causal_mask_adds_exactly_what_masked_fill_sets(seq, past):
    """scores + mask equals scores.masked_fill(future, -inf) bit for bit, and the cached mask stays unwritten."""
    from forge.nn.attention import causal_mask

    scores = torch.randn(2, 3, seq, past + seq)
    future = torch.ones(seq, past + seq, dtype=torch.bool).triu(past + 1)
    mask = causal_mask(seq, past, scores.dtype, scores.device)
    assert torch.equal(scores.clone().add_(mask), scores.masked_fill(future, float("-inf")))
    module = CausalSelfAttention(8, 2, rotary=True)
    x = torch.randn(2, past + seq, 8, requires_grad=True)
    module(x).sum().backward()
    assert torch.equal(causal_mask(seq, past, scores.dtype, scores.device), mask)
    assert torch.equal(mask.isinf(), future) and (mask[~future] == 0).all()
