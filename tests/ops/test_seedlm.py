"""SeedLM: the LFSR against hand-computed sequences, the coefficient quantizer against float64, the search
against an exhaustive float64 search and the reference, decode and the fused linear against float64, and the
replication's error curve on Gaussian weights."""
import math

import numpy as np
import pytest
import torch
from conftest import cpu_backends, gpu_backends

from forge.ops import last_backend, seedlm_decode, seedlm_linear, seedlm_search
from forge.ops import seedlm as S


def interpreter_sized(backend, work, limit):
    """Triton's CPU interpreter runs a program's loop in Python: only small cases there."""
    if backend == "triton" and work > limit:
        pytest.skip("Triton interpreter: small cases only")


def test_lfsr_matches_hand_computed_sequences():
    # The paper's Figure 4: K = 3, taps (0, 1), seed 4 -> 2, 5, 6, 7, 3, 1, 4, 2 (period 7).
    assert S.lfsr_sequence(3, 4, 8) == [2, 5, 6, 7, 3, 1, 4, 2]
    # K = 16, taps (0, 1, 3, 12), from state 1, by hand: 1 has bit 0 -> feedback 1 into bit 15, then plain
    # shifts until bit 12 is set (0x1000 -> feedback 1 -> 0x8800), and 0x8800 taps no set bit.
    assert S.lfsr_sequence(16, 1, 6) == [0x8000, 0x4000, 0x2000, 0x1000, 0x8800, 0x4400]
    # K = 8, taps (0, 2, 3, 4): 0x1d has bits 0, 2, 3, 4 set -> parity 0 -> 0x0e; 0x0e: bits 2, 3 -> 0 -> 0x07.
    assert S.lfsr_sequence(8, 0x1D, 2) == [0x0E, 0x07]


@pytest.mark.parametrize("K", range(2, 17))
def test_paper_taps_give_maximal_length(K):
    walk = S.lfsr_walk(K)
    assert len(np.unique(walk)) == (1 << K) - 1 and walk.min() == 1
    assert S.lfsr_sequence(K, int(walk[-1]), 1) == [1]  # the walk closes on itself


def test_basis_is_the_normalized_states_that_follow_the_seed():
    U = S.seedlm_bases(torch.tensor([4], dtype=torch.int32), K=3, C=4, P=2)[0]
    V = torch.tensor([[2, 5], [6, 7], [3, 1], [4, 2]], dtype=torch.float64)  # Figure 4's V(4)
    torch.testing.assert_close(U.double(), (V - 4) / 3, rtol=1e-7, atol=0)


def quantize_float64(t):
    amax = t.abs().max(dim=-1).values
    e = torch.tensor([min(7, max(-8, math.ceil(math.log2(a / 7.5)))) if a > 0 else -8 for a in amax.tolist()])
    q = (t / torch.pow(2.0, e.double())[:, None]).round().clamp(-8, 7)
    return q, e


def test_coefficient_quantizer_matches_float64_and_exact_boundaries():
    t = torch.randn(500, 4, dtype=torch.float64) * torch.pow(10.0, torch.empty(500, 1).uniform_(-4, 3)).double()
    boundary = torch.tensor([[7.5 * 2.0 ** k, 0.1, -1.0, 0.0] for k in range(-8, 8)], dtype=torch.float64)
    below = boundary.clone()
    below[:, 0] = torch.nextafter(boundary[:, 0].float(), torch.tensor(0.0)).double()
    t = torch.cat([t, boundary, below, -boundary, torch.zeros(1, 4, dtype=torch.float64)])
    q, e, t_hat = S.quantize_coefficients_reference(t.float())
    want_q, want_e = quantize_float64(t.float().double())
    assert torch.equal(e.long(), want_e)
    ratio = t.float().double() / torch.pow(2.0, want_e.double())[:, None]
    near_tie = ((ratio.abs() - ratio.abs().floor()) - 0.5).abs() < 1e-6
    assert torch.equal(q.double()[~near_tie], want_q[~near_tie])
    assert torch.equal(t_hat.double(), q.double() * torch.pow(2.0, e.double())[:, None])


def exhaustive_float64(blocks, K, P, num_seeds):
    """Every candidate seed's error in float64 (the float32 pseudo-inverse and quantizer, as the op)."""
    seeds = S.candidate_seeds(K, num_seeds)
    U = S.seedlm_bases(seeds, K, blocks.shape[1], P)
    t = torch.einsum("spc,bc->sbp", torch.linalg.pinv(U.double()).float(), blocks)
    _, _, t_hat = S.quantize_coefficients_reference(t)
    r = torch.einsum("scp,sbp->sbc", U.double(), t_hat.double()) - blocks.double()
    return seeds, (r * r).sum(-1)                              # (S,), (S, B)


def block_errors(blocks, seeds, q, e, K):
    w = seedlm_decode(seeds, q, e, K=K, C=blocks.shape[1], backend="torch").double()
    return ((w - blocks.double()) ** 2).sum(-1)


@pytest.mark.parametrize("backend", cpu_backends("seedlm_search"))
@pytest.mark.parametrize("n, C, P, K, num_seeds", [(1, 8, 3, 8, None), (37, 8, 3, 10, None), (20, 12, 4, 8, 200),
                                                   (33, 5, 2, 7, None), (16, 3, 3, 6, None), (9, 1, 1, 5, None)])
def test_search_finds_the_float64_minimum(backend, n, C, P, K, num_seeds):
    interpreter_sized(backend, n * (num_seeds or 1 << K), 2048)
    blocks = torch.randn(n, C) * torch.rand(n, 1) * 3
    seeds, q, e, err = seedlm_search(blocks, K=K, P=P, num_seeds=num_seeds, backend=backend)
    assert last_backend("seedlm_search") == backend
    cands, all_err = exhaustive_float64(blocks, K, P, num_seeds)
    got = block_errors(blocks, seeds, q, e, K)
    assert torch.isin(seeds, cands).all()
    # The chosen seed's error is the minimum over all candidates, up to float32 rounding of the comparison.
    torch.testing.assert_close(got, all_err.min(dim=0).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(err.double(), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("seedlm_search"))
def test_search_agrees_with_the_reference_and_fills_every_output(backend, monkeypatch):
    interpreter_sized(backend, 102 * 4095, 4096)
    poison = {torch.int32: -7, torch.int8: 99, torch.float32: float("nan")}
    monkeypatch.setattr(S, "_new_output", lambda shape, dtype, device: torch.full(
        (shape,) if isinstance(shape, int) else shape, poison[dtype], dtype=dtype, device=device))
    blocks = torch.randn(203, 8)[::2]                           # 102 blocks, not a multiple of 16
    ref = S.seedlm_search_reference(blocks.contiguous(), 12, 3)
    got = seedlm_search(blocks, K=12, P=3, backend=backend)  # a non-contiguous view
    same = got[0] == ref[0]
    assert same.float().mean() > 0.95                         # a differing seed is a float32 near-tie:
    torch.testing.assert_close(block_errors(blocks, *got[:3], 12), block_errors(blocks, *ref[:3], 12),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1][same], ref[1][same]) and torch.equal(got[2][same], ref[2][same])
    assert torch.isfinite(got[3]).all()


def test_num_seeds_limits_the_candidates_to_the_start_of_the_walk():
    blocks = torch.randn(40, 8)
    seeds, *_ = seedlm_search(blocks, K=16, P=3, num_seeds=1)
    assert (seeds == 1).all()
    seeds, *_ = seedlm_search(blocks, K=16, P=3, num_seeds=5)
    assert torch.isin(seeds, torch.tensor(S.lfsr_walk(16)[:5], dtype=torch.int32)).all()


def test_all_zero_blocks_decode_to_zero():
    seeds, q, e, err = seedlm_search(torch.zeros(3, 8), K=8, P=3)
    assert (seeds == 1).all() and (q == 0).all() and (e == -8).all() and (err == 0).all()


def gaussian_relative_error(C, P, num_seeds, backend="auto"):
    torch.manual_seed(1234)
    w = torch.randn(128, 96)
    blocks = S.weight_to_blocks(w, C)
    seeds, q, e, _ = seedlm_search(blocks, K=16, P=P, num_seeds=num_seeds, backend=backend)
    w_hat = S.blocks_to_weight(seedlm_decode(seeds, q, e, K=16, C=C), w.shape)
    return ((w.double() - w_hat.double()).norm() / w.double().norm()).item()


@pytest.mark.parametrize("num_seeds, published", [(256, 0.303), (4096, 0.188), (None, 0.123)])
def test_gaussian_error_curve_reproduces_the_replication(num_seeds, published):
    """(C, P, K) = (8, 3, 16), 4 bits a weight: seedlm-repro reports 0.303 / 0.188 / 0.123 for 256 / 4096 / all
    65535 seeds. 12288 weights: the sampling noise of the estimate is about 0.002."""
    if num_seeds is None and "cpu" not in S._dispatch.available_backends("seedlm_search"):
        pytest.skip("the exhaustive search needs the cpu backend to be quick")
    assert abs(gaussian_relative_error(8, 3, num_seeds) - published) < 0.012


@pytest.mark.slow
def test_gaussian_three_bit_error_with_the_torch_search():
    """(12, 4, 16), 3 bits a weight: the replication reports 0.226 (the torch reference, exhaustive: slow)."""
    assert abs(gaussian_relative_error(12, 4, None, backend="torch") - 0.226) < 0.012


def decode_float64(seeds, q, e, K, C):
    walk = S.lfsr_walk(K)
    half = float(1 << (K - 1))
    pos = {int(s): i for i, s in enumerate(walk)}
    rows = []
    for s, qs, es in zip(seeds.tolist(), q.double(), e.tolist()):
        idx = (pos[s] + 1 + np.arange(C * q.shape[1])) % len(walk)
        U = torch.from_numpy((walk[idx].astype(np.float64) - half) / (half - 1)).reshape(C, -1)
        rows.append(U @ (qs * 2.0 ** es))
    return torch.stack(rows)


def random_codes(n, K, P):
    seeds = torch.randint(1, 1 << K, (n,), dtype=torch.int32)
    return seeds, torch.randint(-8, 8, (n, P), dtype=torch.int8), torch.randint(-8, 8, (n,), dtype=torch.int8)


@pytest.mark.parametrize("backend", cpu_backends("seedlm_decode"))
@pytest.mark.parametrize("n, C, P, K", [(1, 8, 3, 16), (45, 12, 4, 10), (17, 7, 2, 5)])
def test_decode_matches_float64(backend, n, C, P, K, monkeypatch):
    monkeypatch.setattr(S, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan")))
    codes = random_codes(n, K, P)
    got = seedlm_decode(*codes, K=K, C=C, backend=backend)
    assert got.shape == (n, C) and last_backend("seedlm_decode") == backend
    want = decode_float64(*codes, K, C)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", cpu_backends("seedlm_linear"))
@pytest.mark.parametrize("x_shape, out_features, C", [((1, 37), 19, 8), ((3, 24), 1, 8), ((2, 5, 13), 7, 12),
                                                      ((1, 1), 33, 8), ((4, 64), 40, 8)])
def test_linear_matches_float64(backend, x_shape, out_features, C, monkeypatch):
    monkeypatch.setattr(S, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan")))
    K, P = 10, 3
    n = -(-out_features * x_shape[-1] // C)
    codes = random_codes(n, K, P)
    x = torch.randn(x_shape)
    y = seedlm_linear(x, *codes, out_features, K=K, C=C, backend=backend)
    assert y.shape == (*x_shape[:-1], out_features) and last_backend("seedlm_linear") == backend
    w = decode_float64(*codes, K, C).reshape(-1)[:out_features * x_shape[-1]].reshape(out_features, -1)
    want = x.double() @ w.T
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("backend", cpu_backends("seedlm_linear"))
def test_linear_takes_non_contiguous_and_half_inputs(backend):
    codes = random_codes(30, 8, 3)
    x = torch.randn(16, 3).T                                   # (3, 16), not contiguous
    ref = S.seedlm_linear_reference(x.contiguous(), *codes, 15, 8, 8)
    torch.testing.assert_close(seedlm_linear(x, *codes, 15, K=8, C=8, backend=backend), ref, rtol=1e-5, atol=1e-4)
    y = seedlm_linear(x.half(), *codes, 15, K=8, C=8, backend=backend)
    assert y.dtype == torch.float16


@pytest.mark.parametrize("call, error, words", [
    (lambda: seedlm_search(torch.randn(4, 8), K=25), ValueError, "K must be"),
    (lambda: seedlm_search(torch.randn(4, 8).double()), TypeError, "blocks must be"),
    (lambda: seedlm_search(torch.randn(4, 8), P=9), ValueError, "P must be"),
    (lambda: seedlm_search(torch.randn(4, 8), K=8, num_seeds=256), ValueError, "num_seeds"),
    (lambda: seedlm_search(torch.full((4, 8), float("nan"))), ValueError, "NaN"),
    (lambda: seedlm_decode(torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int8),
                           torch.zeros(2, dtype=torch.int8)), ValueError, "seeds holds"),
    (lambda: seedlm_decode(torch.ones(2, dtype=torch.int32), torch.full((2, 3), 8, dtype=torch.int8),
                           torch.zeros(2, dtype=torch.int8)), ValueError, "q holds"),
    (lambda: seedlm_linear(torch.randn(2, 8), *random_codes(3, 8, 3), 4, K=8, C=8), ValueError, "has 4 blocks"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_opcheck():
    codes = random_codes(12, 8, 3)
    torch.library.opcheck(torch.ops.forge.seedlm_decode.default, (*codes, 8, 8, "auto"))
    torch.library.opcheck(torch.ops.forge.seedlm_linear.default, (torch.randn(2, 12), *codes, 8, 8, 8, "auto"))
    torch.library.opcheck(torch.ops.forge.seedlm_search.default, (torch.randn(5, 8), 8, 3, 255, "auto"))


@pytest.mark.parametrize("backend", gpu_backends("seedlm_search"))
def test_gpu_backends_match_the_reference(backend):
    blocks = torch.randn(50, 8)
    seeds, q, e, err = seedlm_search(blocks.cuda(), K=8, P=3, backend=backend)
    ref = S.seedlm_search_reference(blocks, 8, 3)
    torch.testing.assert_close(block_errors(blocks, seeds.cpu(), q.cpu(), e.cpu(), 8),
                               block_errors(blocks, *ref[:3], 8), rtol=1e-5, atol=1e-6)
    codes = random_codes(30, 8, 3)
    got = seedlm_decode(*(c.cuda() for c in codes), K=8, C=8, backend=backend)
    torch.testing.assert_close(got.cpu(), S.seedlm_decode_reference(*codes, 8, 8), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 16)
    y = seedlm_linear(x.cuda(), *(c.cuda() for c in codes), 15, K=8, C=8, backend=backend)
    torch.testing.assert_close(y.cpu(), S.seedlm_linear_reference(x, *codes, 15, 8, 8), rtol=1e-4, atol=1e-4)
