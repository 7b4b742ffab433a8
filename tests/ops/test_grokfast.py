"""Grokfast filters: every backend against the formula in float64, over several steps and mixed lists."""
from collections import deque

import pytest
import torch

from conftest import cpu_backends, gpu_backends
from forge.ops import grokfast_ema_, grokfast_ema_reference, grokfast_ma_, last_backend
from forge.ops.grokfast import grokfast_ema_init, grokfast_ma_init

SHAPES = [(5, 7), (1000,), (1, 33), (29, 1), (), (3, 4, 5), (70001,)]  # (70001,) spans two CPU chunks


def make_grads(dtype=torch.float32, device="cpu"):
    return [torch.randn(s, device=device).to(dtype) for s in SHAPES]


def ema_float64(grads_per_step, alpha, lamb, ema):
    """The paper's EMA filter in float64, returning the filtered gradients of the last step."""
    ema = [e.double() for e in ema]
    for grads in grads_per_step:
        out = []
        for i, g in enumerate(grads):
            ema[i] = alpha * ema[i] + (1 - alpha) * g.double()
            out.append(g.double() + lamb * ema[i])
    return out, ema


def tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
@pytest.mark.parametrize("grad_dtype, state_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16)], ids=str)
def test_ema_matches_float64_over_steps(backend, grad_dtype, state_dtype):
    steps = [make_grads(grad_dtype) for _ in range(4)]
    emas = [torch.randn(s).to(state_dtype) for s in SHAPES]
    expected, expected_ema = ema_float64(steps, 0.9, 2.0, emas)
    for grads in steps:
        grokfast_ema_(grads, emas, alpha=0.9, lamb=2.0, backend=backend)
    assert last_backend("grokfast_ema") == backend
    for g, e, want_g, want_e in zip(steps[-1], emas, expected, expected_ema):
        assert g.dtype == grad_dtype and e.dtype == state_dtype
        torch.testing.assert_close(e.double(), want_e, rtol=tol(state_dtype), atol=tol(state_dtype))
        torch.testing.assert_close(g.double(), want_g, rtol=tol(grad_dtype), atol=tol(grad_dtype) * 4)


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_ema_same_rounding_as_reference(backend):
    """bf16 grads with fp32 state: each backend rounds exactly like the reference (1 ulp in the interpreter)."""
    grads = make_grads(torch.bfloat16)
    emas = [torch.randn(g.shape) for g in grads]
    ref_g, ref_e = [g.clone() for g in grads], [e.clone() for e in emas]
    grokfast_ema_reference(ref_g, ref_e, 0.98, 2.0)
    grokfast_ema_(grads, emas, backend=backend)
    for g, e, rg, re in zip(grads, emas, ref_g, ref_e):
        torch.testing.assert_close(e, re, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, rg, rtol=8e-3, atol=1e-2)  # at most one bf16 ulp apart


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_ema_first_step_from_init_is_one_plus_lambda(backend):
    """As in the paper's code: state starts at the first gradient, so step 1 gives (1 + lamb) g."""
    grads = make_grads()
    originals = [g.clone() for g in grads]
    emas = grokfast_ema_init(grads)
    grokfast_ema_(grads, emas, alpha=0.98, lamb=2.0, backend=backend)
    for g, g0 in zip(grads, originals):
        torch.testing.assert_close(g, 3.0 * g0)


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_ema_matches_published_eager_form(backend):
    """ironjr/grokfast: ema = ema*alpha + g*(1-alpha); g = g + ema*lamb, per tensor."""
    grads, emas = make_grads(), [torch.randn(s) for s in SHAPES]
    eager_g, eager_e = [g.clone() for g in grads], [e.clone() for e in emas]
    for _ in range(3):
        for i in range(len(eager_g)):
            eager_e[i] = eager_e[i] * 0.98 + eager_g[i] * (1 - 0.98)
            eager_g[i] = eager_g[i] + eager_e[i] * 2.0
        grokfast_ema_(grads, emas, backend=backend)
    for g, want in zip(grads, eager_g):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_ema_amplifies_the_slow_component(backend):
    """g_t = c + (-1)^t d: the constant (slow) part grows by about 1 + lamb, the alternating part barely.

    The seed system's g + lamb (g - ema) would do the opposite and fails this.
    """
    c, d = torch.full((64,), 1.0), torch.full((64,), 0.5)
    emas = [torch.zeros(64)]
    outs = []
    for t in range(400):
        g = [c + d * (-1) ** t]
        grokfast_ema_(g, emas, alpha=0.9, lamb=2.0, backend=backend)
        outs.append(g[0].clone())
    last = torch.stack(outs[-2:])
    slow, fast = last.mean(0), (last[0] - last[1]).abs() / 2
    torch.testing.assert_close(slow, 3.0 * c, rtol=1e-3, atol=1e-3)
    assert torch.all(fast < 0.6)  # 0.5 * (1 + 2 * 0.1 / 1.9) = 0.553


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_ema_non_contiguous_tensors(backend):
    base_g, base_e = torch.randn(20, 30), torch.randn(30, 20)
    g, e = base_g[::2, ::3], base_e.T[::2, ::3]
    want_g, want_e = g.clone(), e.clone()
    grokfast_ema_reference([want_g], [want_e], 0.98, 2.0)
    grokfast_ema_([g], [e], backend=backend)
    torch.testing.assert_close(base_g[::2, ::3], want_g)
    torch.testing.assert_close(base_e.T[::2, ::3], want_e)


def ma_published(grads_per_step, window, lamb):
    """ironjr/grokfast gradfilter_ma (filter_type='mean', warmup=True), in float64."""
    queues = [deque(maxlen=window) for _ in grads_per_step[0]]
    out = None
    for grads in grads_per_step:
        out = []
        for q, g in zip(queues, grads):
            q.append(g.double())
            out.append(g.double() + lamb * sum(q) / len(q) if len(q) == window else g.double())
    return out


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ma"))
@pytest.mark.parametrize("grad_dtype, ring_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("n_steps", [2, 3, 9])
def test_ma_matches_published_deque_form(backend, grad_dtype, ring_dtype, n_steps):
    window = 3
    steps = [make_grads(grad_dtype) for _ in range(n_steps)]
    expected = ma_published(steps, window, 5.0)
    rings, sums = grokfast_ma_init(steps[0], window, dtype=ring_dtype)
    for step, grads in enumerate(steps):
        grokfast_ma_(grads, rings, sums, step, lamb=5.0, backend=backend)
    assert last_backend("grokfast_ma") == backend
    for g, want in zip(steps[-1], expected):
        torch.testing.assert_close(g.double(), want, rtol=tol(grad_dtype) * 5, atol=tol(grad_dtype) * 20)


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ma"))
def test_ma_reads_one_slot_per_step(backend):
    """O(1) in the window: slots other than the one being replaced are never read (poison them)."""
    window = 50
    grads = [torch.randn(8, 9)]
    rings, sums = grokfast_ma_init(grads, window)
    shadow = rings[0].clone()  # what the ring should hold
    for step in range(window + 3):
        slot = step % window
        rings[0].fill_(float("nan"))
        rings[0][slot] = shadow[slot]
        g = [torch.randn(8, 9)]
        grokfast_ma_(g, rings, sums, step, lamb=1.0, backend=backend)
        assert torch.isfinite(g[0]).all() and torch.isfinite(sums[0]).all()
        shadow[slot] = rings[0][slot]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: grokfast_ema_([], []), ValueError, "grads is empty"),
        (lambda: grokfast_ema_(torch.randn(3), [torch.randn(3)]), TypeError, "list or tuple"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(3), torch.randn(3)]), ValueError, "differ in length"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(4)]), ValueError, "has shape (3,)"),
        (lambda: grokfast_ema_([torch.arange(3)], [torch.randn(3)]), TypeError, "grads[0] must have dtype"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(3).double()]), TypeError, "emas[0] must have dtype"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(3)], alpha=1.0), ValueError, "Invalid alpha"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(3)], lamb=float("nan")), ValueError, "Invalid lamb"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.randn(3)], backend="cuda"), ValueError, "available here"),
        (lambda: grokfast_ema_([torch.randn(3)], [torch.empty(3, device="meta")]), ValueError, "is on cpu but emas[0] is on meta"),
        (lambda: grokfast_ema_([torch.randn(3), torch.empty(2, device="meta")], [torch.randn(3), torch.empty(2, device="meta")]),
         ValueError, "spans several devices"),
        (lambda: grokfast_ma_([torch.randn(3)], [torch.zeros(2, 4)], [torch.zeros(3)], 0), ValueError, "rings[0] must have shape"),
        (lambda: grokfast_ma_([torch.randn(3)], [torch.zeros(2, 3)], [torch.zeros(3)], -1), ValueError, "Invalid step"),
        (lambda: grokfast_ma_([torch.randn(3)], [torch.zeros(2, 3)], [torch.zeros(3).half()], 0), TypeError, "sums[0]"),
    ],
)
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


@pytest.mark.parametrize("backend", cpu_backends("grokfast_ema"))
def test_non_finite_gradients_propagate_not_hidden(backend):
    grads, emas = [torch.tensor([1.0, float("nan"), float("inf")])], [torch.zeros(3)]
    grokfast_ema_(grads, emas, backend=backend)
    assert grads[0][0].isfinite() and grads[0][1].isnan() and not grads[0][2].isfinite()


# ---------------------------------------------------------------------------------------------------------
# GPU (skips without a CUDA device)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("grokfast_ema"))
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_ema_matches_float64(backend, grad_dtype):
    steps = [make_grads(grad_dtype, "cuda") for _ in range(3)]
    emas = [torch.randn(s, device="cuda") for s in SHAPES]
    expected, _ = ema_float64(steps, 0.9, 2.0, emas)
    for grads in steps:
        grokfast_ema_(grads, emas, alpha=0.9, lamb=2.0, backend=backend)
    for g, want in zip(steps[-1], expected):
        torch.testing.assert_close(g.double(), want, rtol=tol(grad_dtype), atol=tol(grad_dtype) * 4)


@pytest.mark.parametrize("backend", gpu_backends("grokfast_ma"))
def test_gpu_ma_matches_published(backend):
    steps = [make_grads(torch.float32, "cuda") for _ in range(7)]
    expected = ma_published(steps, 3, 5.0)
    rings, sums = grokfast_ma_init(steps[0], 3)
    for step, grads in enumerate(steps):
        grokfast_ma_(grads, rings, sums, step, lamb=5.0, backend=backend)
    for g, want in zip(steps[-1], expected):
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-4)
