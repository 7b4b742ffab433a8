"""BitNet b1.58 ops: every backend against the formulas in float64, STE gradients, packing, the ternary matmul."""
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_backends, gpu_backends
from forge.ops import (
    act_quant_int8,
    last_backend,
    pack_ternary,
    ste_act_int8,
    ste_ternary,
    ternary_linear,
    ternary_quant,
    unpack_ternary,
)
from forge.ops.bitnet import pack_ternary_reference

SHAPES = [(1, 33), (29, 1), (37, 45), (64, 128), (3, 4, 5)]
DTYPES = {"torch": [torch.float32, torch.float16, torch.bfloat16], "cpu": [torch.float32, torch.float16, torch.bfloat16],
          "triton": [torch.float32, torch.float16]}  # Triton's CPU interpreter computes bf16 arithmetic wrongly


def ternary_float64(w, per_channel):
    rows = w.double().reshape(w.shape[0], -1) if per_channel else w.double().reshape(1, -1)
    scale = rows.abs().mean(dim=1).clamp_min(1e-5)
    ratio = rows / scale[:, None]
    return ratio.round().clamp(-1, 1).reshape(w.shape), scale, ratio.reshape(w.shape)


def act_float64(x):
    scale = x.double().abs().amax(-1).clamp_min(1e-5) / 127
    ratio = x.double() / scale[..., None]
    return ratio.round().clamp(-127, 127), scale, ratio


def assert_rounded_like(q, want, ratio):
    """q equals the float64 rounding except where float32 puts the value within 1e-4 of a .5 tie."""
    near_tie = ((ratio.abs() - ratio.abs().floor()) - 0.5).abs() < 1e-4
    assert q.dtype == torch.int8
    assert torch.equal(q.double()[~near_tie], want[~near_tie])


def cases(op):
    return [pytest.param(b.values[0], d, marks=b.marks, id=f"{b.values[0]}-{str(d).replace('torch.', '')}")
            for b in cpu_backends(op) for d in DTYPES[b.values[0]]]


@pytest.mark.parametrize("backend, dtype", cases("ternary_quant"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_ternary_quant_matches_float64(backend, dtype, shape, per_channel):
    w = torch.randn(shape).to(dtype)
    q, scale = ternary_quant(w, per_channel=per_channel, backend=backend)
    assert last_backend("ternary_quant") == backend
    want_q, want_scale, ratio = ternary_float64(w, per_channel)
    assert q.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == ((shape[0],) if per_channel else ())
    torch.testing.assert_close(scale.double().reshape(-1), want_scale, rtol=1e-6, atol=0)
    assert_rounded_like(q, want_q, ratio)
    assert set(q.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("backend, dtype", cases("act_quant_int8"))
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 700)], ids=str)
def test_act_quant_matches_float64(backend, dtype, shape):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    q, scale = act_quant_int8(x, backend=backend)
    want_q, want_scale, ratio = act_float64(x)
    assert scale.shape == x.shape[:-1] and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-6, atol=0)
    assert_rounded_like(q, want_q, ratio)
    assert (q.abs().amax(-1) == 127).all()  # the largest value of each token maps to +-127


@pytest.mark.parametrize("backend, dtype", cases("ste_ternary"))
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_ste_ternary_forward_is_dequantized_and_gradient_is_identity(backend, dtype, per_channel):
    w = torch.randn(37, 45).to(dtype).requires_grad_()
    out = ste_ternary(w, per_channel=per_channel, backend=backend)
    q, scale = ternary_quant(w.detach(), per_channel=per_channel, backend=backend)
    want = (q.float() * scale.reshape(-1, 1)).to(dtype) if per_channel else (q.float() * scale).to(dtype)
    assert out.dtype == dtype and torch.equal(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(w.grad, grad)


@pytest.mark.parametrize("backend, dtype", cases("ste_act_int8"))
def test_ste_act_forward_is_dequantized_and_gradient_is_identity(backend, dtype):
    x = torch.randn(5, 7, 33).to(dtype).requires_grad_()
    out = ste_act_int8(x, backend=backend)
    q, scale = act_quant_int8(x.detach(), backend=backend)
    assert torch.equal(out, (q.float() * scale[..., None]).to(dtype))
    err = (out.double() - x.double()).abs()  # within half a quantization step, plus the dtype's rounding
    assert (err <= 0.5 * scale.double()[..., None] + x.double().abs() * torch.finfo(dtype).eps).all()
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("backend", cpu_backends("ternary_quant"))
def test_non_contiguous_inputs(backend):
    base = torch.randn(40, 60)
    w = base.T[::2, ::3]
    q, scale = ternary_quant(w, per_channel=True, backend=backend)
    q_ref, scale_ref = ternary_quant(w.contiguous(), per_channel=True, backend=backend)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    x = torch.randn(9, 50)[:, ::2]
    assert torch.equal(ste_act_int8(x, backend=backend), ste_act_int8(x.contiguous(), backend="torch"))  # absmax: exact


def test_packing_layout_is_planar_with_padding():
    """k = 5, kb = 2: codes q + 1 = [0, 1, 2, 2, 1] then padding 1, 1, 1; byte j holds weights j, 2 + j, 4 + j, 6 + j."""
    q = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0 | 2 << 2 | 1 << 4 | 1 << 6, 1 | 2 << 2 | 1 << 4 | 1 << 6]]


@pytest.mark.parametrize("backend", cpu_backends("pack_ternary"))
@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (29, 1), (7, 4), (37, 45), (16, 4099)], ids=str)
def test_pack_unpack_round_trip(backend, shape):
    q = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(q, backend=backend)
    assert packed.shape == (shape[0], (shape[1] + 3) // 4)
    assert torch.equal(packed, pack_ternary_reference(q))
    assert torch.equal(unpack_ternary(packed, shape[1], backend=backend), q)
    assert torch.equal(unpack_ternary(pack_ternary(q[:, ::2]), q[:, ::2].shape[1], backend=backend), q[:, ::2])


def linear_float64(x, q, scale):
    xq, xs, _ = act_float64(x)
    want = (xq @ q.double().T) * xs[..., None] * scale.double().reshape(-1)
    return want


@pytest.mark.parametrize("backend", cpu_backends("ternary_linear"))
@pytest.mark.parametrize("x_shape, n", [((1, 64), 32), ((1, 45), 1), ((8, 37), 29), ((2, 3, 130), 17), ((5, 1), 3)], ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_ternary_linear_matches_float64(backend, x_shape, n, per_channel):
    x, w = torch.randn(x_shape), torch.randn(n, x_shape[-1])
    q, scale = ternary_quant(w, per_channel=per_channel)
    y = ternary_linear(x, pack_ternary(q), scale, n, backend=backend)
    assert last_backend("ternary_linear") == backend
    assert y.shape == x_shape[:-1] + (n,) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), linear_float64(x, q, scale), rtol=1e-5, atol=1e-6)
    # the fake-quantized float computation (what BitLinear trains with) gives the same numbers
    dense = F.linear(ste_act_int8(x, backend="torch"), ste_ternary(w, per_channel=per_channel, backend="torch"))
    torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends("ternary_linear"))
def test_ternary_linear_half_precision_and_error_bound(backend):
    """fp16 x gives fp16 y; against the unquantized activations the error stays within int8 rounding:
    |y - x . Wq^T| <= sum_k |Wq[n, k]| * s_x / 2 for each token."""
    x, w = torch.randn(4, 70), torch.randn(24, 70)
    q, scale = ternary_quant(w)
    y = ternary_linear(x.half(), pack_ternary(q), scale, 24, backend=backend)
    assert y.dtype == torch.float16
    wq = q.double() * scale.double()
    exact = x.half().double() @ wq.T
    _, xs, _ = act_float64(x.half())
    bound = wq.abs().sum(1)[None, :] * xs[:, None] / 2
    assert ((y.double() - exact).abs() <= bound * 1.01 + 1e-2).all()


@pytest.mark.parametrize("backend", cpu_backends("ste_ternary"))
def test_nan_propagates(backend):
    w = torch.randn(6, 8)
    w[2, 3] = float("nan")
    q, scale = ternary_quant(w, backend=backend)
    assert scale.isnan()
    assert ste_ternary(w, backend=backend).isnan().all()
    q, scale = ternary_quant(w, per_channel=True, backend=backend)
    assert scale[2].isnan() and scale[[0, 1, 3, 4, 5]].isfinite().all()
    x = torch.randn(3, 8)
    x[1, 5] = float("nan")
    _, xs = act_quant_int8(x, backend=backend)
    assert xs[1].isnan() and xs[[0, 2]].isfinite().all()
    out = ste_act_int8(x, backend=backend)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    qw, sw = ternary_quant(torch.randn(5, 8))
    y = ternary_linear(x, pack_ternary(qw), sw, 5, backend=backend)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Triton's interpreter, on NaN
@pytest.mark.parametrize("backend", cpu_backends("act_quant_int8"))
def test_non_finite_tokens_match_the_reference(backend):
    """A token holding +Inf, -Inf or NaN: scale Inf/NaN, q = 0, dequantized and ternary_linear outputs NaN,
    on every backend as in the reference (the cpu kernel gave q = -127 and y = -Inf)."""
    x = torch.randn(5, 24)
    x[0, 3], x[1, 0], x[2, 23] = float("inf"), float("-inf"), float("nan")
    q, scale = act_quant_int8(x, backend=backend)
    want_q, want_scale = act_quant_int8(x, backend="torch")
    assert torch.equal(q, want_q) and (q[:3] == 0).all()
    torch.testing.assert_close(scale, want_scale, equal_nan=True, rtol=0, atol=0)
    out = ste_act_int8(x, backend=backend)
    assert out[:3].isnan().all() and out[3:].isfinite().all()
    torch.testing.assert_close(out, ste_act_int8(x, backend="torch"), equal_nan=True, rtol=0, atol=0)
    qw, sw = ternary_quant(torch.randn(7, 24), per_channel=True)
    y = ternary_linear(x, pack_ternary(qw), sw, 7, backend=backend)
    assert y[:3].isnan().all() and y[3:].isfinite().all()
    torch.testing.assert_close(y, ternary_linear(x, pack_ternary(qw), sw, 7, backend="torch"), equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Triton's interpreter, on NaN
@pytest.mark.parametrize("backend, dtype", cases("act_quant_int8"))
def test_non_finite_tokens_in_every_dtype_and_leading_shape(backend, dtype):
    """As above on a (2, 3, 16) x in each dtype: the kernels write the non-finite rows themselves (q = 0, NaN
    dequantized values and outputs) wherever they sit among the leading dims."""
    x = torch.randn(2, 3, 16).to(dtype)
    x[0, 2, 5], x[1, 0, 0], x[1, 1, 15] = float("nan"), float("inf"), float("-inf")
    bad = torch.tensor([[False, False, True], [True, True, False]])
    q, scale = act_quant_int8(x, backend=backend)
    _, want_scale = act_quant_int8(x, backend="torch")
    assert q.shape == x.shape and scale.shape == (2, 3)
    assert (q[bad] == 0).all() and torch.equal(scale.isfinite(), ~bad)
    torch.testing.assert_close(scale, want_scale, equal_nan=True, rtol=1e-6, atol=0)
    out = ste_act_int8(x, backend=backend)
    assert out.dtype == dtype and out[bad].isnan().all() and out[~bad].isfinite().all()
    qw, sw = ternary_quant(torch.randn(5, 16))
    y = ternary_linear(x, pack_ternary(qw), sw, 5, backend=backend)
    assert y.shape == (2, 3, 5) and y[bad].isnan().all() and y[~bad].isfinite().all()


@pytest.mark.parametrize("backend", cpu_backends("ternary_linear"))
@pytest.mark.parametrize("features", [21, 22, 23])
def test_narrower_activation_than_the_packed_weight_is_refused(backend, features):
    """21-23 features share ceil(k / 4) = 6 bytes a row with 24: the padding codes tell them apart."""
    q = torch.randint(-1, 2, (9, 24), dtype=torch.int8)
    q[:, 21:] = 1  # weights in every slot past 21
    packed, scale = pack_ternary(q), torch.ones(1)
    with pytest.raises(ValueError, match=f"nonzero weights past x's {features} features"):
        ternary_linear(torch.randn(3, features), packed, scale, 9, backend=backend)
    with pytest.raises(ValueError, match=f"past in_features={features}"):
        unpack_ternary(packed, features)
    # A weight packed with `features` inputs is accepted: its padding holds zero weights.
    narrow = q[:, :features].contiguous()
    x = torch.randn(3, features)
    torch.testing.assert_close(ternary_linear(x, pack_ternary(narrow), scale, 9, backend=backend),
                               ternary_linear(x, pack_ternary(narrow), scale, 9, backend="torch"))


def test_packed_codes_are_checked_once_per_version_and_again_after_an_in_place_write(monkeypatch):
    from forge.ops import bitnet

    reads = []
    real_stack = torch.stack
    monkeypatch.setattr(bitnet.torch, "stack", lambda *a, **k: reads.append(1) or real_stack(*a, **k))
    q = torch.randint(-1, 2, (5, 7), dtype=torch.int8)
    packed, scale, x = pack_ternary(q), torch.ones(1), torch.randn(2, 7)
    reads.clear()
    first = ternary_linear(x, packed, scale, 5, backend="torch")
    checks = len(reads)
    assert checks > 0
    for _ in range(3):
        torch.testing.assert_close(ternary_linear(x, packed, scale, 5, backend="torch"), first)
    assert len(reads) == checks                        # the same, unchanged tensor is not read again
    packed[0, 0] = 0xFF                                # an in-place write: code 3 now, and it is seen
    with pytest.raises(ValueError, match="invalid 2-bit code 3"):
        ternary_linear(x, packed, scale, 5, backend="torch")


def test_all_zero_inputs_use_eps_not_nan():
    q, scale = ternary_quant(torch.zeros(4, 4))
    assert scale.item() == pytest.approx(1e-5) and (q == 0).all()
    assert (ste_act_int8(torch.zeros(2, 3)) == 0).all()


W, Q, P = torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.uint8)


@pytest.mark.parametrize("call, error, words", [
    (lambda: ternary_quant(torch.arange(6)), TypeError, "w must have dtype"),
    (lambda: ternary_quant(W.double()), TypeError, "w must have dtype"),
    (lambda: ternary_quant([1.0, 2.0]), TypeError, "w must be a torch.Tensor"),
    (lambda: ternary_quant(torch.empty(0, 3)), ValueError, "w is empty"),
    (lambda: ternary_quant(torch.randn(5), per_channel=True), ValueError, "per_channel=True needs"),
    (lambda: ternary_quant(W, per_channel="yes"), TypeError, "per_channel must be a bool"),
    (lambda: ternary_quant(W, eps=0.0), ValueError, "Invalid eps"),
    (lambda: ternary_quant(W, backend="fastest"), ValueError, "Invalid backend"),
    (lambda: act_quant_int8(torch.tensor(3.0)), ValueError, "at least 1 dim"),
    (lambda: act_quant_int8(torch.ones(3, dtype=torch.int32)), TypeError, "x must have dtype"),
    (lambda: ste_act_int8(torch.ones(3, 0)), ValueError, "x is empty"),
    (lambda: ste_ternary(torch.ones(3, dtype=torch.int64)), TypeError, "w must have dtype"),
    (lambda: pack_ternary(W), TypeError, "q must be an int8 tensor"),
    (lambda: pack_ternary(torch.zeros(6, dtype=torch.int8)), ValueError, "must be 2-dim"),
    (lambda: pack_ternary(torch.full((2, 3), 2, dtype=torch.int8)), ValueError, "only -1, 0 and 1"),
    (lambda: pack_ternary(torch.tensor([[-128, 0, 1, 1]], dtype=torch.int8)), ValueError, "only -1, 0 and 1"),
    (lambda: pack_ternary(torch.zeros(2, 3, dtype=torch.int8, device="meta")), ValueError, "q is a meta tensor"),
    (lambda: unpack_ternary(torch.full((4, 2), 0b01010111, dtype=torch.uint8), 8), ValueError, "invalid 2-bit code 3"),
    (lambda: ternary_linear(torch.randn(2, 8), torch.full((4, 2), 0b11010101, dtype=torch.uint8), torch.ones(1), 4),
     ValueError, "invalid 2-bit code 3"),
    (lambda: ternary_linear(torch.randn(2, 8, device="meta"), P.to("meta"), torch.ones(1, device="meta"), 4),
     ValueError, "packed is a meta tensor"),
    (lambda: unpack_ternary(P, 9), ValueError, "in_features=9 needs"),
    (lambda: unpack_ternary(P.to(torch.int8), 6), TypeError, "2-dim uint8"),
    (lambda: unpack_ternary(P, 0), ValueError, "Invalid in_features"),
    (lambda: ternary_linear(torch.randn(2, 6), P, torch.ones(1), 5), ValueError, "out_features=5 but packed has 4 rows"),
    (lambda: ternary_linear(torch.randn(2, 9), P, torch.ones(1), 4), ValueError, "in_features=9 needs"),
    (lambda: ternary_linear(torch.randn(2, 6), P, torch.ones(3), 4), ValueError, "1 or out_features=4 values"),
    (lambda: ternary_linear(torch.randn(2, 6), P, torch.ones(1).double(), 4), TypeError, "scale must be a float32"),
    (lambda: ternary_linear(torch.ones(2, 6, dtype=torch.int8), P, torch.ones(1), 4), TypeError, "x must have dtype"),
    (lambda: ternary_linear(torch.randn(2, 6), P, torch.ones(1, device="meta"), 4), ValueError, "scale is on meta"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_opcheck():
    w, x = torch.randn(6, 10), torch.randn(3, 10)
    q, scale = ternary_quant(w)
    for op, args in [(torch.ops.forge.ternary_quant.default, (w, True, 1e-5, "auto")),
                     (torch.ops.forge.act_quant_int8.default, (x, 1e-5, "auto")),
                     (torch.ops.forge.ste_ternary.default, (w.clone().requires_grad_(), False, 1e-5, "auto")),
                     (torch.ops.forge.ste_act_int8.default, (x.clone().requires_grad_(), 1e-5, "auto")),
                     (torch.ops.forge.ternary_linear.default, (x, pack_ternary(q), scale.reshape(1), 6, 1e-5, "auto"))]:
        torch.library.opcheck(op, args)


def test_compiled_matches_eager():
    def f(w, x):
        return F.linear(ste_act_int8(x), ste_ternary(w)).square().sum()

    w, x = torch.randn(12, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True)
    f(w, x).backward()
    eager = (w.grad.clone(), x.grad.clone())
    w.grad = x.grad = None
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True)(w, x).backward()
    torch.testing.assert_close(w.grad, eager[0])
    torch.testing.assert_close(x.grad, eager[1])


# ---------------------------------------------------------------------------------------------------------
# GPU (skips without a CUDA device): every backend against the torch reference on the same device
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("ternary_quant"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_quantizers_match_reference(backend, dtype):
    w, x = torch.randn(300, 5000, device="cuda").to(dtype), torch.randn(7, 4099, device="cuda").to(dtype)
    for per_channel in (False, True):
        q, scale = ternary_quant(w, per_channel=per_channel, backend=backend)
        want_q, want_scale, ratio = ternary_float64(w.cpu(), per_channel)
        torch.testing.assert_close(scale.cpu().double().reshape(-1), want_scale, rtol=1e-6, atol=0)
        assert_rounded_like(q.cpu(), want_q, ratio)
    q, scale = act_quant_int8(x, backend=backend)
    want_q, want_scale, ratio = act_float64(x.cpu())
    torch.testing.assert_close(scale.cpu().double(), want_scale, rtol=1e-6, atol=0)
    assert_rounded_like(q.cpu(), want_q, ratio)
    wg = w.clone().requires_grad_()
    out = ste_ternary(wg, backend=backend)
    out.backward(torch.ones_like(out))
    assert torch.equal(wg.grad, torch.ones_like(out))


@pytest.mark.parametrize("backend", gpu_backends("ternary_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_ternary_linear_matches_float64(backend, dtype):
    x, w = torch.randn(8, 4099, device="cuda").to(dtype), torch.randn(1000, 4099, device="cuda")
    q, scale = ternary_quant(w, per_channel=True)
    y = ternary_linear(x, pack_ternary(q), scale, 1000, backend=backend)
    want = linear_float64(x.cpu(), q.cpu(), scale.cpu())
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(y.cpu().double(), want, rtol=tol, atol=tol)
