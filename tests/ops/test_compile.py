"""The ops are torch.library ops: they pass opcheck and run inside torch.compile like in eager."""
import pytest
import torch

from forge.ops import grokfast_ema_, grokfast_ma_, newton_schulz
from forge.ops.grokfast import grokfast_ma_init


def train_like_step(w, grads, emas, rings, sums):
    grokfast_ema_(grads, emas, alpha=0.9, lamb=2.0)
    grokfast_ma_(grads, rings, sums, 0, lamb=1.0, warmup=False)
    return w - 0.1 * newton_schulz(grads[0], steps=5)


def fresh_inputs():
    torch.manual_seed(7)
    grads = [torch.randn(24, 40), torch.randn(40)]
    emas = [torch.zeros_like(g) for g in grads]
    rings, sums = grokfast_ma_init(grads, 4)
    return torch.randn(24, 40), grads, emas, rings, sums


def test_compiled_function_matches_eager():
    eager_in, compiled_in = fresh_inputs(), fresh_inputs()
    expected = train_like_step(*eager_in)
    torch._dynamo.reset()
    out = torch.compile(train_like_step, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_in[1] + compiled_in[2] + compiled_in[4], eager_in[1] + eager_in[2] + eager_in[4]):
        torch.testing.assert_close(a, b)  # the in-place updates happened under compile too


@pytest.mark.parametrize("G", [torch.randn(6, 10), torch.randn(10, 6).T, torch.randn(2, 5, 3)], ids=["wide", "view", "batch"])
def test_opcheck_newton_schulz(G):
    coefficients = [3.4445, -4.7750, 2.0315] * 5
    torch.library.opcheck(torch.ops.forge.newton_schulz.default, (G, coefficients, 1e-7, "auto", True))


def test_opcheck_grokfast():
    grads, emas = [torch.randn(5, 3), torch.randn(7)], [torch.zeros(5, 3), torch.zeros(7)]
    torch.library.opcheck(torch.ops.forge.grokfast_ema_.default, (grads, emas, 0.9, 2.0, "auto"))
    rings, sums = grokfast_ma_init(grads, 3)
    torch.library.opcheck(torch.ops.forge.grokfast_ma_.default, (grads, rings, sums, 1, 2.0, True, "auto"))
