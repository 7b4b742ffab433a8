"""kl_div_logits: every backend against F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)
in float64, for the loss and the student's gradient, with masks, temperatures, reductions, dtypes."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import forge.ops

from conftest import cpu_backends, gpu_backends
from forge.ops import kl_div_logits, kl_div_logits_reference, last_backend
from forge.ops._memory import peak_allocated_bytes

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _native_cpu() -> bool:
    return "cpu" in forge.ops.available_backends("kl_div_logits")


def float64_kl(s, t, temperature, mask, reduction):
    """Loss and d loss / d s (for the given grad_output weights) in float64, the kept rows selected by
    boolean indexing and reduced by F.kl_div itself."""
    vocab = s.shape[-1]
    s64 = s.detach().double().requires_grad_()
    rows_s, rows_t = s64.reshape(-1, vocab), t.detach().double().reshape(-1, vocab)
    keep = torch.ones(rows_s.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    ls = F.log_softmax(rows_s[keep.to(s.device)] / temperature, -1)
    lt = F.log_softmax(rows_t[keep.to(s.device)] / temperature, -1)
    if reduction == "none":
        per_row = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
        loss = torch.zeros(keep.shape[0], dtype=torch.float64, device=s.device)
        loss = loss.masked_scatter(keep.to(s.device), per_row).reshape(s.shape[:-1])
    elif int(keep.sum()) == 0:
        loss = rows_s.sum() * 0.0
    else:
        with warnings.catch_warnings():  # torch warns that its "mean" divides by every element; we mean that
            warnings.simplefilter("ignore", UserWarning)
            loss = F.kl_div(ls, lt, log_target=True, reduction=reduction)
    return loss, s64


def check_against_float64(s, t, temperature=1.0, mask=None, reduction="batchmean", backend="auto",
                          rtol=1e-5, grad_rtol=1e-4):
    s = s.detach().requires_grad_()
    out = kl_div_logits(s, t, temperature, mask=mask, reduction=reduction, backend=backend)
    expected, s64 = float64_kl(s, t, temperature, mask, reduction)
    assert out.dtype == s.dtype and out.shape == expected.shape
    weights = torch.rand_like(expected) + 0.5  # grad_output != 1 (per row for "none")
    (out * weights.to(out.dtype)).sum().backward()
    (expected * weights).sum().backward()
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(out.double(), expected.detach(), rtol=rtol, atol=rtol * scale)
    grad_scale = s64.grad.abs().max().item() + 1e-30
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=grad_rtol, atol=grad_rtol * grad_scale)
    return out


CASES = [  # shape, temperature, reduction, masked
    ((1, 1), 1.0, "sum", False),
    ((1, 700), 1.0, "batchmean", False),
    ((5, 1), 2.0, "none", False),
    ((3, 1031), 0.5, "mean", True),
    ((2, 3, 37), 3.0, "none", True),
    ((2, 7, 2049), 1.0, "batchmean", True),
    ((4, 513, 1271), 2.0, "batchmean", False),
    ((2, 32000), 1.5, "sum", False),
]


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("shape, temperature, reduction, masked", CASES, ids=[str(c[0]) for c in CASES])
def test_matches_float64(backend, shape, temperature, reduction, masked):
    if backend == "triton" and shape == (4, 513, 1271):
        pytest.skip("about 2 minutes in Triton's CPU interpreter; the GPU test runs this shape")
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    mask = (torch.rand(shape[:-1]) > 0.3) if masked else None
    check_against_float64(s, t, temperature, mask, reduction, backend)
    assert last_backend("kl_div_logits") == backend


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_with_mask_and_temperature(backend, reduction):
    s, t = torch.randn(6, 301) * 2, torch.randn(6, 301) * 2
    mask = torch.tensor([True, False, True, True, False, True])
    check_against_float64(s, t, 0.7, mask, reduction, backend)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs(backend, dtype):
    """Stated tolerances: the loss is returned in the input dtype (relative rounding 2^-8 for bf16,
    2^-11 for fp16) and the gradient is rounded to it; the math runs in float32 on the rounded inputs."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 wrongly (tested on the GPU)")
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    s, t = (torch.randn(3, 5, 777) * 2).to(dtype), (torch.randn(3, 5, 777) * 2).to(dtype)
    for reduction in ("none", "batchmean"):
        check_against_float64(s, t, 1.3, torch.rand(3, 5) > 0.2, reduction, backend, rtol=tol, grad_rtol=tol)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_non_contiguous_inputs(backend):
    base_s, base_t = torch.randn(40, 9), torch.randn(40, 9)
    check_against_float64(base_s.T, base_t.T.contiguous(), backend=backend)  # vocabulary not contiguous
    wide_s, wide_t = torch.randn(9, 50), torch.randn(9, 61)
    check_against_float64(wide_s[:, 3:43], wide_t[:, :40], 2.0, reduction="none", backend=backend)  # row strides
    seq_s, seq_t = torch.randn(2, 6, 33), torch.randn(2, 6, 33)
    check_against_float64(seq_s[:, :-1], seq_t[:, 1:], mask=torch.rand(2, 5) > 0.5, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_a_gradient_matches_the_autograd_path(backend, reduction):
    """A call with nothing to differentiate runs the forward kernel alone (on the cpu backend without its
    log-sum-exp outputs): the same values bit for bit as through the autograd.Function, masked or not, and
    against float64; batchmean without a mask is exactly the sum over the rows (one mean call on the CPU)."""
    s, t = torch.randn(2, 5, 37) * 3, torch.randn(2, 5, 37) * 3
    for mask in (None, torch.rand(2, 5) > 0.4):
        tracked = kl_div_logits(s.clone().requires_grad_(), t, 1.5, mask=mask, reduction=reduction, backend=backend)
        plain = kl_div_logits(s, t, 1.5, mask=mask, reduction=reduction, backend=backend)
        with torch.no_grad():
            no_grad = kl_div_logits(s.clone().requires_grad_(), t, 1.5, mask=mask, reduction=reduction, backend=backend)
        assert tracked.requires_grad and not plain.requires_grad and not no_grad.requires_grad
        assert torch.equal(plain, tracked.detach()) and torch.equal(no_grad, plain)
        expected, _ = float64_kl(s, t, 1.5, mask, reduction)
        scale = expected.abs().max().item() + 1e-30
        torch.testing.assert_close(plain.double(), expected.detach(), rtol=1e-5, atol=1e-5 * scale)
    for rows in range(1, 25) if reduction == "batchmean" else ():  # 1 / rows as a factor: off by an ulp on some
        s, t = torch.randn(rows, 37) * 3, torch.randn(rows, 37) * 3
        total = kl_div_logits(s, t, reduction="sum", backend=backend)
        assert torch.equal(kl_div_logits(s, t, reduction="batchmean", backend=backend), total / rows)


@pytest.mark.skipif(not _native_cpu(), reason="forge._C not loaded")
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_cpu_reduction_is_one_native_call_whatever_the_thread_count(reduction):
    """The cpu backend reduces natively (a double sum in row order): without a gradient the call runs no torch op but
    its output's allocation; the value does not depend on the thread count, with or without autograd, and matches
    float64 over thousands of rows."""
    s, t = torch.randn(3000, 64) * 3, torch.randn(3000, 64) * 3   # 1024-row thread chunks: 3 threads can run
    mask = torch.rand(3000) > 0.3
    with torch.autograd.profiler.profile() as prof:
        kl_div_logits(s, t, 1.5, reduction=reduction, backend="cpu")
    assert {event.name for event in prof.function_events} <= {"aten::empty"}
    threads = torch.get_num_threads()
    try:
        values = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            values.append(kl_div_logits(s, t, 1.5, mask=mask, reduction=reduction, backend="cpu"))
            values.append(kl_div_logits(s.clone().requires_grad_(), t, 1.5, mask=mask, reduction=reduction,
                                        backend="cpu").detach())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(value, values[0]) for value in values)
    expected, _ = float64_kl(s, t, 1.5, mask, reduction)
    torch.testing.assert_close(values[0].double(), expected.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_masked_gives_zero_and_zero_grad(backend, reduction):
    s = torch.randn(3, 4, 50, requires_grad=True)
    t = torch.randn(3, 4, 50)
    s.data[1, 2, 5] = float("nan")  # a masked row's NaN stays out
    out = kl_div_logits(s, t, mask=torch.zeros(3, 4, dtype=torch.bool), reduction=reduction, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_masked_rows_get_zero_gradient_even_with_nan(backend):
    s, t = torch.randn(4, 90), torch.randn(4, 90)
    s[1, 3], t[2, 7] = float("nan"), float("inf")
    mask = torch.tensor([True, False, False, True])
    s.requires_grad_()
    out = kl_div_logits(s, t, mask=mask, reduction="sum", backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.equal(s.grad[1:3], torch.zeros(2, 90))
    check_against_float64(s, t, mask=mask, reduction="sum", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_nan_propagates(backend):
    s, t = torch.randn(3, 200), torch.randn(3, 200)
    s[0, 5] = float("nan")
    t[2, 150] = float("nan")
    rows = kl_div_logits(s, t, reduction="none", backend=backend)
    assert torch.isnan(rows[0]) and torch.isnan(rows[2]) and torch.isfinite(rows[1])
    assert torch.isnan(kl_div_logits(s, t, backend=backend))


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_teacher_minus_infinity_is_probability_zero(backend):
    """A teacher logit of -inf (e.g. a padded vocabulary) is p = 0 and adds nothing: finite loss and grad."""
    s, t = torch.randn(3, 64), torch.randn(3, 64)
    t[:, 60:] = float("-inf")
    s.requires_grad_()
    out = kl_div_logits(s, t, 2.0, reduction="sum", backend=backend)
    out.backward()
    p, log_q = F.softmax(t.double() / 2, -1), F.log_softmax(s.detach().double() / 2, -1)
    expected = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), (log_q.exp() - p) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_teacher_gets_no_gradient(backend):
    s, t = torch.randn(4, 30, requires_grad=True), torch.randn(4, 30, requires_grad=True)
    kl_div_logits(s, t, backend=backend).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_identical_logits_give_zero(backend):
    s = torch.randn(5, 333) * 4
    assert abs(kl_div_logits(s, s.clone(), backend=backend).item()) < 1e-5


def test_reference_is_the_torch_backend_and_matches_float64():
    s, t = torch.randn(3, 4, 50), torch.randn(3, 4, 50)
    mask = torch.rand(3, 4) > 0.4
    for reduction in REDUCTIONS:
        got = kl_div_logits_reference(s, t, 1.7, mask, reduction)
        torch.testing.assert_close(got.double(), float64_kl(s, t, 1.7, mask, reduction)[0].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_div_logits(s, t, 1.7, mask, reduction, backend="torch"), got)


def test_cpu_kernels_use_rows_not_rows_times_vocab_memory():
    """Forward + backward allocate the gradient and O(rows) more; eager F.kl_div needs several logits."""
    s, t = torch.randn(64, 8000, requires_grad=True), torch.randn(64, 8000)
    logits_bytes = s.numel() * 4

    def step(fn):
        def run():
            fn(s, t).backward()
            s.grad = None
        return peak_allocated_bytes(run)

    fused = step(lambda a, b: kl_div_logits(a, b, backend="cpu"))
    eager = step(lambda a, b: F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True,
                                       reduction="batchmean"))
    assert fused <= logits_bytes * 1.01  # the gradient itself, plus 1% (O(rows) stats)
    assert eager >= 3 * logits_bytes


@pytest.mark.parametrize("backend", gpu_backends("kl_div_logits"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_matches_float64(backend, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for shape, masked in (((4, 513, 1271), True), ((3, 32000), False), ((1, 1), False)):
        s, t = (torch.randn(shape, device="cuda") * 3).to(dtype), (torch.randn(shape, device="cuda") * 3).to(dtype)
        mask = (torch.rand(shape[:-1], device="cuda") > 0.3) if masked else None
        for reduction in ("none", "batchmean"):
            check_against_float64(s, t, 1.5, mask, reduction, backend, rtol=tol, grad_rtol=max(tol, 1e-4))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"teacher_logits": torch.randn(4, 11)}, ValueError, "differ in vocabularies"),
    ({"teacher_logits": torch.randn(5, 10)}, ValueError, "differ in shapes"),
    ({"teacher_logits": torch.randn(4, 10).half()}, TypeError, "teacher_logits must have student_logits' dtype"),
    ({"student_logits": torch.randint(0, 5, (4, 10))}, TypeError, "student_logits must have dtype"),
    ({"teacher_logits": torch.randint(0, 5, (4, 10))}, TypeError, "teacher_logits must have dtype"),
    ({"mask": torch.ones(4, 10, dtype=torch.bool)}, ValueError, r"mask must have shape \(4,\)"),
    ({"mask": torch.ones(4)}, TypeError, "mask must have dtype bool"),
    ({"temperature": 0.0}, ValueError, "Invalid temperature"),
    ({"temperature": -1.0}, ValueError, "Invalid temperature"),
    ({"temperature": float("nan")}, ValueError, "Invalid temperature"),
    ({"reduction": "average"}, ValueError, "Invalid reduction: 'average'; expected one of"),
    ({"student_logits": torch.randn(4, 0), "teacher_logits": torch.randn(4, 0)}, ValueError, "vocabulary dim"),
    ({"backend": "fastest"}, ValueError, "Invalid backend"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    args = {"student_logits": torch.randn(4, 10), "teacher_logits": torch.randn(4, 10), **kwargs}
    with pytest.raises(error, match=match):
        kl_div_logits(**args)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(with_mask):
    s, t = torch.randn(5, 37, requires_grad=True), torch.randn(5, 37)
    keep = torch.tensor([True, False, True, True, True]) if with_mask else None
    torch.library.opcheck(torch.ops.forge.kl_div_rows.default, (s, t, 0.5, keep, "cpu"))
    lse = torch.randn(5)
    torch.library.opcheck(torch.ops.forge.kl_div_rows_backward.default,
                          (s.detach(), t, lse, lse.clone(), torch.rand(5), 0.5, "cpu"))


def test_compiled_matches_eager():
    def loss_fn(s, t, mask):
        return kl_div_logits(s, t, 2.0, mask=mask) * 3.0

    s, t, mask = torch.randn(2, 5, 40), torch.randn(2, 5, 40), torch.rand(2, 5) > 0.3
    eager_s, compiled_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    expected = loss_fn(eager_s, t, mask)
    expected.backward()
    torch._dynamo.reset()
    got = torch.compile(loss_fn, fullgraph=True)(compiled_s, t, mask)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_s.grad, eager_s.grad)
