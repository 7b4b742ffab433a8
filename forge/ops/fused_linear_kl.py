"""The output head and the KL baking loss together, in row chunks, never holding rows x vocab logits.

    s = h W^T + b,   t = h_teacher W^T + b  (or given teacher logits),   loss = KL(softmax(t/T) || softmax(s/T))

Per chunk of rows: the logits (student and teacher from one matmul when they share the head, as in
prompt baking: the two hidden chunks are stacked, so each weight tile is read once for both), the
row kernels of `kl_div_logits` (loss and log-sum-exps in one read), then, when a gradient is needed,
the logits' gradient written over the chunk's student logits and pushed through the head at once:
grad_h[chunk] = G W, grad_W += G^T h[chunk], grad_b += sum G. So the forward does the backward's
matmuls and the backward only scales by grad_output (Liger-Kernel's fused linear cross entropy,
Hsu et al. 2024, arXiv 2410.10989). Peak extra memory: one chunk of logits (two with a teacher), plus
the gradients of the inputs.

reduction="none" has a per-row grad_output that the weight gradient cannot take afterwards, so there
the forward keeps only the loss and the backward runs the chunks again (one more head matmul).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.ops._validate import check_finite_number, check_float_tensor, check_positive_int
from forge.ops.kl_div import KLKernels, check_mask, check_reduction, kernels_for, reduce_rows, rows_view


@dataclass(frozen=True)
class _Plan:
    kernels: KLKernels
    inv_t: float
    reduction: str
    chunk: int
    lead_shape: tuple
    vocab: int


def default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk, to a power of two: the larger of Liger-Kernel's rule (rows / ceil(vocab / hidden):
    a chunk of logits about the size of the hidden states) and rows / 8 (at most about 8 chunks, since
    each chunk reads and writes the whole vocab x hidden weight gradient, and small chunks make slow
    matmuls; timings in benchmarks/RESULTS.md, "Measurements behind kernel constants")."""
    liger = -(-rows // max(1, -(-vocab // hidden)))
    target = max(liger, -(-rows // 8), 1)
    return 1 << (target - 1).bit_length()


def _chunk_logits(h, w, b, teacher_h, teacher_logits):
    """(student, teacher) logits of one chunk; a shared head does one matmul for both."""
    if teacher_h is None:
        return (h @ w.T if b is None else torch.addmm(b, h, w.T)), teacher_logits
    both = torch.cat([h, teacher_h])
    logits = both @ w.T if b is None else torch.addmm(b, both, w.T)
    return logits[:h.shape[0]], logits[h.shape[0]:]


def _linear_kl_pass(plan: _Plan, h, w, b, teacher_h, teacher_logits, keep, row_scale=None, grads=None):
    """Per-row KL (float32, 0 on masked rows) over all chunks. With `grads` = (grad_h, grad_w, grad_b)
    (the last two may be None), also the gradients for per-row factors `row_scale` (float32)."""
    rows = h.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=h.device)
    for start in range(0, rows, plan.chunk):
        part = slice(start, min(rows, start + plan.chunk))
        s, t = _chunk_logits(h[part], w, b, None if teacher_h is None else teacher_h[part],
                             None if teacher_logits is None else teacher_logits[part])
        loss[part], lse_s, lse_t = plan.kernels.forward(s, t, plan.inv_t, None if keep is None else keep[part])
        if grads is not None:
            plan.kernels.backward(s, t, lse_s, lse_t, row_scale[part], plan.inv_t, s)  # gradient over the logits
            grad_h, grad_w, grad_b = grads
            torch.mm(s, w, out=grad_h[part])
            if grad_w is not None:
                grad_w.addmm_(s.T, h[part])
            if grad_b is not None:
                grad_b.add_(s.sum(0))
    return loss


def _new_grads(h, w, b, needs):
    return (torch.empty_like(h), torch.zeros_like(w) if needs[1] else None,
            torch.zeros_like(b) if b is not None and needs[2] else None)


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, teacher_h, teacher_logits, keep, plan: _Plan):
        ctx.plan = plan
        needs = ctx.needs_input_grad
        if plan.reduction == "none" or not any(needs[:3]):
            ctx.save_for_backward(h, w, b, teacher_h, teacher_logits, keep)
            loss = _linear_kl_pass(plan, h, w, b, teacher_h, teacher_logits, keep)
            return reduce_rows(loss, keep, plan.reduction, plan.vocab, plan.lead_shape).to(h.dtype)
        with torch.enable_grad():  # d(reduction)/d(row loss), from the one reduce_rows
            probe = torch.zeros(h.shape[0], device=h.device, requires_grad=True)
            (weights,) = torch.autograd.grad(reduce_rows(probe, keep, plan.reduction, plan.vocab, plan.lead_shape), probe)
        grads = _new_grads(h, w, b, needs)
        loss = _linear_kl_pass(plan, h, w, b, teacher_h, teacher_logits, keep, _masked_scale(weights, keep, plan), grads)
        ctx.save_for_backward(*grads)
        return reduce_rows(loss, keep, plan.reduction, plan.vocab, plan.lead_shape).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        if plan.reduction == "none":
            h, w, b, teacher_h, teacher_logits, keep = ctx.saved_tensors
            grads = _new_grads(h, w, b, ctx.needs_input_grad)
            scale = _masked_scale(grad_out.reshape(-1).float(), keep, plan)
            _linear_kl_pass(plan, h, w, b, teacher_h, teacher_logits, keep, scale, grads)
        else:
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        grad_h, grad_w, grad_b = grads
        return (grad_h if ctx.needs_input_grad[0] else None), grad_w, grad_b, None, None, None, None


def _masked_scale(weights, keep, plan: _Plan):
    scale = weights.float() * plan.inv_t
    return (scale if keep is None else torch.where(keep, scale, 0.0)).contiguous()


def _check_fused_inputs(student_hidden, weight, teacher_hidden, teacher_logits, bias):
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("weight", weight)
    if student_hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, hidden) with hidden = student_hidden.shape[-1]; got weight "
                         f"{tuple(weight.shape)} and student_hidden {tuple(student_hidden.shape)}")
    if (teacher_hidden is None) == (teacher_logits is None):
        raise ValueError("give exactly one of teacher_hidden (shared head) and teacher_logits")
    lead, vocab = tuple(student_hidden.shape[:-1]), weight.shape[0]
    expected = {"teacher_hidden": tuple(student_hidden.shape), "teacher_logits": lead + (vocab,), "bias": (vocab,)}
    named = {"weight": weight, "teacher_hidden": teacher_hidden, "teacher_logits": teacher_logits, "bias": bias}
    for name, x in named.items():
        if x is None:
            continue
        check_float_tensor(name, x)
        if name in expected and tuple(x.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}; got {tuple(x.shape)}")
        if x.dtype != student_hidden.dtype:
            raise TypeError(f"{name} must have student_hidden's dtype {student_hidden.dtype}; got {x.dtype}")
        if x.device != student_hidden.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {student_hidden.device}")


def fused_linear_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
                    teacher_logits: torch.Tensor | None = None, temperature: float = 1.0,
                    mask: torch.Tensor | None = None, reduction: str = "batchmean", chunk_rows: int | None = None,
                    bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """kl_div_logits(h W^T + b, teacher) without materializing the logits of all rows.

    Args:
        student_hidden: (..., hidden). weight: (vocab, hidden), the output head; bias: (vocab,) or None.
        teacher_hidden: (..., hidden) through the same head (prompt baking), or teacher_logits
            (..., vocab); exactly one. The teacher is a constant (no gradient reaches it).
        temperature, mask, reduction: as kl_div_logits (batchmean and mean divide by the kept rows).
        chunk_rows: rows per chunk (default: default_chunk_rows, about hidden-sized logits a chunk).
        backend: the kl_div_logits row kernels to use ("auto", "torch", "cpu", "triton", "cuda").
    Gradients: student_hidden, weight and bias, each when it requires grad; the weight's is accumulated
    chunk by chunk in the weight's dtype. Not a torch.library op (eager autograd only).
    """
    _check_fused_inputs(student_hidden, weight, teacher_hidden, teacher_logits, bias)
    temperature = check_finite_number("temperature", temperature, low=0.0, low_open=True)
    mask = check_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    reduction = check_reduction(reduction)
    hidden, vocab = weight.shape[1], weight.shape[0]
    h = student_hidden.reshape(-1, hidden)
    chunk = default_chunk_rows(h.shape[0], hidden, vocab) if chunk_rows is None else check_positive_int("chunk_rows", chunk_rows)
    plan = _Plan(kernels_for(h.device, backend), 1.0 / temperature, reduction, chunk,
                 tuple(student_hidden.shape[:-1]), vocab)
    teacher_h = None if teacher_hidden is None else teacher_hidden.detach().reshape(-1, hidden)
    teacher_l = None if teacher_logits is None else rows_view(teacher_logits.detach())
    keep = None if mask is None else mask.reshape(-1).contiguous()
    return _FusedLinearKL.apply(h, weight, bias, teacher_h, teacher_l, keep, plan)
