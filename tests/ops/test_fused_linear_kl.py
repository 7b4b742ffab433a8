"""fused_linear_kl against the unfused float64 computation (head matmul, then F.kl_div), for the loss and
the gradients of the hidden states, the weight and the bias, with chunks that do not divide the rows."""
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_backends
from forge.ops import fused_linear_kl, kl_div_logits
from forge.ops._memory import peak_allocated_bytes
from forge.ops.fused_linear_kl import default_chunk_rows

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def unfused_float64(h, w, b, teacher_h, teacher_logits, temperature, mask, reduction):
    """Loss and leaves (h, w, b) in float64: full logits, then F.kl_div over the kept rows."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    s = F.linear(h64, w64, b64)
    t = F.linear(teacher_h.double(), w64.detach(), None if b64 is None else b64.detach()) if teacher_h is not None \
        else teacher_logits.double()
    keep = torch.ones(s.shape[:-1], dtype=torch.bool) if mask is None else mask
    ls, lt = F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1)
    per_row = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    if reduction == "none":
        loss = torch.zeros(keep.shape, dtype=torch.float64).masked_scatter(keep, per_row)
    else:
        divisor = {"sum": 1, "batchmean": max(int(keep.sum()), 1), "mean": max(int(keep.sum()), 1) * s.shape[-1]}
        loss = per_row.sum() / divisor[reduction]
    return loss, (h64, w64, b64)


def check_fused(h, w, b=None, teacher_h=None, teacher_logits=None, temperature=1.0, mask=None,
                reduction="batchmean", chunk_rows=None, backend="auto", tol=1e-5):
    leaves = [x.detach().requires_grad_() if x is not None else None for x in (h, w, b)]
    out = fused_linear_kl(leaves[0], leaves[1], teacher_hidden=teacher_h, teacher_logits=teacher_logits,
                          temperature=temperature, mask=mask, reduction=reduction, chunk_rows=chunk_rows,
                          bias=leaves[2], backend=backend)
    expected, leaves64 = unfused_float64(h, w, b, teacher_h, teacher_logits, temperature, mask, reduction)
    weights = torch.rand_like(expected) + 0.5  # grad_output != 1
    (out * weights.to(out.dtype)).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tol, atol=tol * (expected.abs().max().item() + 1e-30))
    for mine, ref in zip(leaves, leaves64):
        if mine is not None:
            torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=tol * 10, atol=tol * 10 * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shared_head", [True, False], ids=["shared-head", "teacher-logits"])
def test_matches_unfused_float64(backend, reduction, shared_head):
    h, w, b = torch.randn(2, 9, 24), torch.randn(301, 24) * 0.3, torch.randn(301) * 0.1
    teacher_h = torch.randn(2, 9, 24) if shared_head else None
    teacher_logits = None if shared_head else torch.randn(2, 9, 301) * 2
    mask = torch.rand(2, 9) > 0.3
    check_fused(h, w, b, teacher_h, teacher_logits, 1.7, mask, reduction, chunk_rows=4, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends("kl_div_logits"))
def test_default_chunks_no_bias_no_mask(backend):
    h, w = torch.randn(37, 16), torch.randn(1000, 16) * 0.5
    check_fused(h, w, teacher_h=torch.randn(37, 16), backend=backend)
    check_fused(h[:1], w, teacher_logits=torch.randn(1, 1000), temperature=0.5, reduction="sum", backend=backend)


def test_same_value_as_kl_div_logits_on_the_full_logits():
    h, w, th = torch.randn(20, 12), torch.randn(77, 12), torch.randn(20, 12)
    got = fused_linear_kl(h, w, teacher_hidden=th, temperature=2.0, chunk_rows=6)
    torch.testing.assert_close(got, kl_div_logits(h @ w.T, th @ w.T, 2.0), rtol=1e-6, atol=1e-7)


def test_bf16_against_float64():
    """Stated tolerance 3e-2: the logits are bf16 matmul results and the weight gradient is accumulated
    chunk by chunk in bf16."""
    h, w = torch.randn(33, 32).bfloat16(), (torch.randn(500, 32) * 0.2).bfloat16()
    check_fused(h, w, teacher_h=torch.randn(33, 32).bfloat16(), chunk_rows=8, tol=3e-2)


def test_frozen_weight_and_teacher_get_no_gradient():
    h = torch.randn(10, 8, requires_grad=True)
    w, th = torch.randn(50, 8), torch.randn(10, 8, requires_grad=True)
    fused_linear_kl(h, w, teacher_hidden=th, chunk_rows=3).backward()
    assert h.grad is not None and w.grad is None and th.grad is None
    h.grad = None
    w.requires_grad_()
    with torch.no_grad():
        loss = fused_linear_kl(h, w, teacher_hidden=th)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_all_rows_masked():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    out = fused_linear_kl(h, w, teacher_logits=torch.randn(6, 40), mask=torch.zeros(6, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_default_chunk_rows():
    assert default_chunk_rows(4096, 1024, 32000) == 512  # rows / 8 (Liger's rule alone: 128)
    assert default_chunk_rows(4096, 8192, 32000) == 1024  # Liger's rule: rows / ceil(vocab / hidden)
    assert default_chunk_rows(1, 16, 1000) == 1
    assert default_chunk_rows(37, 16, 1000) == 8


def test_peak_memory_is_a_fraction_of_unfused():
    rows, hidden, vocab = 512, 64, 4000
    h, w = torch.randn(rows, hidden, requires_grad=True), torch.randn(vocab, hidden, requires_grad=True)
    th = torch.randn(rows, hidden)

    def step(fn):
        def run():
            fn().backward()
            h.grad = w.grad = None
        return peak_allocated_bytes(run)

    fused = step(lambda: fused_linear_kl(h, w, teacher_hidden=th, chunk_rows=32))
    unfused = step(lambda: F.kl_div(F.log_softmax(h @ w.T, -1), F.log_softmax(th @ w.T, -1), log_target=True,
                                    reduction="batchmean"))
    assert fused * 4 <= unfused
    assert fused < rows * vocab * 4  # less than one full logits tensor


@pytest.mark.parametrize("kwargs, error, match", [
    ({"teacher_hidden": None}, ValueError, "exactly one of teacher_hidden"),
    ({"teacher_logits": torch.randn(5, 20)}, ValueError, "exactly one of teacher_hidden"),
    ({"weight": torch.randn(20, 7)}, ValueError, r"weight must be \(vocab, hidden\)"),
    ({"weight": torch.randn(20)}, ValueError, r"weight must be \(vocab, hidden\)"),
    ({"teacher_hidden": torch.randn(5, 7)}, ValueError, r"teacher_hidden must have shape \(5, 8\)"),
    ({"teacher_hidden": None, "teacher_logits": torch.randn(5, 21)}, ValueError, r"teacher_logits must have shape \(5, 20\)"),
    ({"bias": torch.randn(19)}, ValueError, r"bias must have shape \(20,\)"),
    ({"weight": torch.randn(20, 8).half()}, TypeError, "weight must have student_hidden's dtype"),
    ({"student_hidden": torch.randint(0, 3, (5, 8))}, TypeError, "student_hidden must have dtype"),
    ({"mask": torch.ones(5, 20, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ({"temperature": 0}, ValueError, "Invalid temperature"),
    ({"reduction": "avg"}, ValueError, "Invalid reduction"),
    ({"chunk_rows": 0}, ValueError, "Invalid chunk_rows"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    args = {"student_hidden": torch.randn(5, 8), "weight": torch.randn(20, 8), "teacher_hidden": torch.randn(5, 8),
            **kwargs}
    with pytest.raises(error, match=match):
        fused_linear_kl(**args)
