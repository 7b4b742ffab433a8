"""KL divergence between a teacher's and a student's softmax at temperature T, from raw logits.

    p = softmax(t / T),  q = softmax(s / T)   over the last dim (the vocabulary), per row
    KL(p || q) = sum_i p_i (t_i - s_i) / T - (lse(t / T) - lse(s / T))
    d KL / d s  = (q - p) / T

(knowledge distillation at a temperature: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a
Neural Network", arXiv 1503.02531; used here for prompt baking and the KL regularizer.)

The kernels read each row once in the forward with an online softmax (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax", arXiv 1805.02867): running maxima and sums for both
softmaxes and the running sum of p_i (t_i - s_i), rescaled when a maximum grows. The forward keeps
only the two log-sum-exps per row (O(rows) memory); the backward reads the row again and writes
(q - p) / T times the row's weight in one pass. Nothing of size rows x vocab is allocated besides
the gradient itself. (Liger-Kernel instead writes the gradient during the forward; that keeps a
rows x vocab buffer alive from forward to backward, which the recompute avoids at the same traffic:
two reads of the logits in each scheme. `fused_linear_kl` does use the in-forward gradient, on chunks.)

File layout: the reference, validation, the per-row kernels of each backend, the torch.library ops
with their autograd rule, the reduction, the public op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_finite_number, check_float_tensor

REDUCTIONS = ("none", "sum", "mean", "batchmean")
REDUCTION_CODES = {"sum": 1, "mean": 2, "batchmean": 3}   # forge._C.kl_div_reduce's codes


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def kl_div_logits_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                            mask: torch.Tensor | None = None, reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) in plain PyTorch (float32 math, result in the student's dtype).

    Per row: F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) summed over the vocabulary.
    Rows where `mask` is False count as 0 (their inputs are replaced before any arithmetic, so even a
    NaN there stays out). "none" gives one value per row; "sum" their sum; "batchmean" the sum over the
    number of kept rows; "mean" the sum over kept rows x vocab (torch's "mean": every element). With
    no kept row the result is 0.
    """
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    t = teacher_logits.detach().float().reshape(-1, vocab)
    keep = None if mask is None else mask.reshape(-1, 1)
    if keep is not None:
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    rows = pointwise_kl(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)).sum(-1)
    if keep is not None:
        rows = torch.where(keep[:, 0], rows, 0.0)
    return reduce_rows(rows, mask, reduction, vocab, student_logits.shape[:-1]).to(student_logits.dtype)


def pointwise_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) per element, as F.kl_div(log_target=True), except that p = 0 (a teacher logit of
    -inf, e.g. a padded vocabulary) gives 0 where F.kl_div gives 0 * -inf = NaN. Other NaNs stay."""
    return torch.where(log_p == float("-inf"), 0.0, F.kl_div(log_q, log_p, log_target=True, reduction="none"))


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str, vocab: int, lead_shape) -> torch.Tensor:
    """Per-row losses (0 on masked rows) -> the reduction; batchmean/mean divide by the kept rows (at least 1)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    if reduction == "batchmean" and mask is None and rows.is_cpu and rows.shape[0] > 0:
        return rows.mean()  # on the CPU exactly sum / rows (torch's mean_out: sum_out, then div_), in one call
    total = rows.sum()
    if reduction == "sum":
        return total
    per_row = vocab if reduction == "mean" else 1
    if mask is None:  # a Python divisor: one op, where a count tensor took four (each a few us on tiny inputs)
        return total / float(max(rows.shape[0], 1) * per_row)
    kept = mask.sum().to(rows.dtype).clamp_min(1.0)
    return total / (kept * per_row if per_row != 1 else kept)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}; expected one of {REDUCTIONS}")
    return reduction


def check_mask(mask, lead_shape, device) -> torch.Tensor | None:
    """None, or a bool tensor of the logits' shape without the vocabulary dim, on their device."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype bool; got {str(mask.dtype).replace('torch.', '')}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have shape {tuple(lead_shape)} (the logits' shape without the vocabulary); "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
    return mask


def _check_logits(student, teacher) -> None:
    check_float_tensor("student_logits", student)
    check_float_tensor("teacher_logits", teacher)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student_logits must have a vocabulary dim of size >= 1; got shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        which = "vocabularies" if student.shape[-1] != teacher.shape[-1] else "shapes"
        raise ValueError(f"student_logits and teacher_logits differ in {which}: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise TypeError(f"teacher_logits must have student_logits' dtype {student.dtype}; got {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits is on {teacher.device}")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, vocab) with unit stride along the vocabulary: a view when possible, else a copy."""
    vocab = x.shape[-1]
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    if x.dim() >= 1 and x.stride(-1) == 1:
        try:
            return x.view(-1, vocab)
        except RuntimeError:
            pass
    return x.reshape(-1, vocab).contiguous()


# ---------------------------------------------------------------------------------------------
# Per-row kernels of each backend
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KLKernels:
    """One backend's row kernels, and the whole op on that backend (calling the object).

    forward(s, t, inv_t, keep) -> (loss, lse_s, lse_t): float32 (rows,), 0 on rows where keep is False.
    loss_only(s, t, inv_t, keep) -> (loss, None, None), where nothing needs the backward (None: forward).
    backward(s, t, lse_s, lse_t, row_scale, inv_t, out): out <- (softmax(s*inv_t) - softmax(t*inv_t)) *
        row_scale[:, None], in out's dtype; out may be s itself (rows with row_scale 0 get zeros).
    reduce(loss, keep, vocab, reduction) -> (0-dim float32 loss, divisor): the reduction ("sum", "mean",
        "batchmean") of per-row losses; reduced_loss(s, t, inv_t, keep, reduction) -> the same from the logits
        in one call, where nothing needs the backward. Where a backend has them (cpu), every eager reduced call
        reduces through them, with or without autograd, so both give the same value bit for bit.
    s, t, out: (rows, vocab) with unit last stride; keep: contiguous bool (rows,) or None.
    """

    name: str
    forward: Callable
    backward: Callable
    loss_only: Callable | None = None
    reduce: Callable | None = None
    reduced_loss: Callable | None = None

    def __call__(self, student, teacher, temperature, mask, reduction):
        if self.name == "torch":
            return kl_div_logits_reference(student, teacher, temperature, mask, reduction)
        keep = None if mask is None else mask.reshape(-1).contiguous()
        teacher = teacher.detach() if teacher.requires_grad else teacher
        s, t = rows_view(student), rows_view(teacher)
        if self.reduce is not None and reduction != "none" and not torch.compiler.is_compiling():
            loss = self.reduced_eager(s, t, 1.0 / temperature, keep, reduction)
        else:
            loss, _, _ = _dispatch.call_op(_kl_div_rows_op, self.rows_eager, s, t, 1.0 / temperature, keep, self.name)
            loss = reduce_rows(loss, keep, reduction, student.shape[-1], student.shape[:-1])
        return loss if loss.dtype == student.dtype else loss.to(student.dtype)

    def reduced_eager(self, student, teacher, inv_temperature, keep, reduction):
        """The reduced loss through the backend's own reduction: one native call without autograd (per-call cost:
        benchmarks/op_overhead.py), else _KLLoss."""
        if _dispatch.needs_autograd(student):
            return _KLLoss.apply(student, teacher, inv_temperature, keep, reduction, self)
        return self.reduced_loss(student, teacher, inv_temperature, keep, reduction)

    def rows_eager(self, student, teacher, inv_temperature, keep, backend):
        """forge::kl_div_rows in eager mode: through _KLRows where autograd needs the backward, else the forward
        kernel alone (the autograd.Function costs ~20 us a call on tiny inputs: benchmarks/op_overhead.py)."""
        if _dispatch.needs_autograd(student):
            return _KLRows.apply(student, teacher, inv_temperature, keep, backend)
        return (self.loss_only or self.forward)(student, teacher, inv_temperature, keep)


def _row_outputs(s: torch.Tensor):
    return tuple(torch.empty(s.shape[0], dtype=torch.float32, device=s.device) for _ in range(3))


def _forward_torch(s, t, inv_t, keep):
    xs, xt = s.float() * inv_t, t.float() * inv_t
    lse_s, lse_t = xs.logsumexp(-1), xt.logsumexp(-1)
    loss = pointwise_kl(xs - lse_s[:, None], xt - lse_t[:, None]).sum(-1)
    if keep is not None:
        loss, lse_s, lse_t = (torch.where(keep, v, 0.0) for v in (loss, lse_s, lse_t))
    return loss, lse_s, lse_t


def _backward_torch(s, t, lse_s, lse_t, row_scale, inv_t, out):
    diff = (s.float() * inv_t - lse_s[:, None]).exp() - (t.float() * inv_t - lse_t[:, None]).exp()
    out.copy_(torch.where(row_scale[:, None] == 0, 0.0, diff * row_scale[:, None]))


def _cpu_args(*tensors):
    return [0 if x is None else x.data_ptr() for x in tensors]


def _forward_cpu(s, t, inv_t, keep):
    out = _row_outputs(s)
    _native.cpu_module().kl_div_forward(*_cpu_args(s, t, keep, *out), s.shape[0], s.shape[1], s.stride(0),
                                        t.stride(0), _native.dtype_code(s), inv_t, torch.get_num_threads())
    return out


def _loss_only_cpu(s, t, inv_t, keep):
    """_forward_cpu without the two log-sum-exp outputs (pointers 0): two allocations fewer."""
    loss = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    _native.cpu_module().kl_div_forward(*_cpu_args(s, t, keep, loss), 0, 0, s.shape[0], s.shape[1], s.stride(0),
                                        t.stride(0), _native.dtype_code(s), inv_t, torch.get_num_threads())
    return loss, None, None


def _reduce_cpu(loss, keep, vocab, reduction):
    out = torch.empty((), dtype=torch.float32)
    divisor = _native.cpu_module().kl_div_reduce(*_cpu_args(loss, keep), loss.shape[0], vocab,
                                                 REDUCTION_CODES[reduction], out.data_ptr())
    return out, divisor


def _reduced_loss_cpu(s, t, inv_t, keep, reduction):
    """forward + _reduce_cpu in one native call (the per-row losses in a scratch buffer of the kernel's own)."""
    out = torch.empty((), dtype=torch.float32)
    _native.cpu_module().kl_div_loss(*_cpu_args(s, t, keep), s.shape[0], s.shape[1], s.stride(0), t.stride(0),
                                     _native.dtype_code(s), inv_t, REDUCTION_CODES[reduction], out.data_ptr(),
                                     torch.get_num_threads())
    return out


def _backward_cpu(s, t, lse_s, lse_t, row_scale, inv_t, out):
    _native.cpu_module().kl_div_backward(*_cpu_args(s, t, lse_s, lse_t, row_scale, out), s.shape[0], s.shape[1],
                                         s.stride(0), t.stride(0), out.stride(0), _native.dtype_code(s), inv_t,
                                         torch.get_num_threads())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _forward_cuda(s, t, inv_t, keep):
    out = _row_outputs(s)
    _native.cuda_module().kl_div_forward(*_cpu_args(s, t, keep, *out), s.shape[0], s.shape[1], s.stride(0),
                                         t.stride(0), _native.dtype_code(s), inv_t, _stream(s.device))
    return out


def _backward_cuda(s, t, lse_s, lse_t, row_scale, inv_t, out):
    _native.cuda_module().kl_div_backward(*_cpu_args(s, t, lse_s, lse_t, row_scale, out), s.shape[0], s.shape[1],
                                          s.stride(0), t.stride(0), out.stride(0), _native.dtype_code(s), inv_t,
                                          _stream(s.device))


def _forward_triton(s, t, inv_t, keep):
    from forge.kernels.kl_div import kl_div_forward_triton

    out = _row_outputs(s)
    kl_div_forward_triton(s, t, keep, inv_t, *out)
    return out


def _backward_triton(s, t, lse_s, lse_t, row_scale, inv_t, out):
    from forge.kernels.kl_div import kl_div_backward_triton

    kl_div_backward_triton(s, t, lse_s, lse_t, row_scale, inv_t, out)


for _name, _fwd, _bwd in (("torch", _forward_torch, _backward_torch), ("triton", _forward_triton, _backward_triton),
                          ("cuda", _forward_cuda, _backward_cuda)):
    _dispatch.register("kl_div_logits", _name)(KLKernels(_name, _fwd, _bwd))
_dispatch.register("kl_div_logits", "cpu")(KLKernels("cpu", _forward_cpu, _backward_cpu, _loss_only_cpu, _reduce_cpu,
                                                     _reduced_loss_cpu))


def kernels_for(device: torch.device, backend: str = "auto") -> KLKernels:
    """The row kernels `backend` resolves to for tensors on `device` (recorded as kl_div_logits' last backend)."""
    return _dispatch.resolve("kl_div_logits", device, backend)


# ---------------------------------------------------------------------------------------------
# torch.library ops: per-row losses with their backward (used in eager and under torch.compile)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("forge::kl_div_rows", mutates_args=())
def _kl_div_rows_op(student: torch.Tensor, teacher: torch.Tensor, inv_temperature: float,
                    keep: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(kernels_for(student.device, backend).forward(student, teacher, inv_temperature, keep))


@_kl_div_rows_op.register_fake
def _(student, teacher, inv_temperature, keep, backend):
    return tuple(student.new_empty(student.shape[0], dtype=torch.float32) for _ in range(3))


def _gradient(kernels: KLKernels, student, teacher, lse_s, lse_t, row_scale, inv_temperature: float) -> torch.Tensor:
    """d loss / d student from the row-gradient kernel, row i weighted by row_scale[i]."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    kernels.backward(student, teacher, lse_s, lse_t, row_scale, inv_temperature, grad)
    return grad


def _row_scale(weight: torch.Tensor, keep: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Each row's gradient weight: `weight` (per row, or one for every row) where the row is kept, 0 elsewhere."""
    if keep is not None:
        weight = torch.where(keep, weight, 0.0)
    return weight.expand(rows).contiguous()


def _rows_gradient(student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                   row_scale: torch.Tensor, inv_temperature: float, backend: str) -> torch.Tensor:
    return _gradient(kernels_for(student.device, backend), student, teacher, lse_s, lse_t, row_scale,
                     inv_temperature)


_kl_div_rows_backward_op = torch.library.custom_op("forge::kl_div_rows_backward", _rows_gradient, mutates_args=())


@_kl_div_rows_backward_op.register_fake
def _(student, teacher, lse_s, lse_t, row_scale, inv_temperature, backend):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, teacher, inv_temperature, keep, backend = inputs
    ctx.save_for_backward(student, teacher, output[1], output[2], keep)
    ctx.inv_temperature, ctx.backend = inv_temperature, backend


def _rows_backward(ctx, grad_loss, _grad_lse_s, _grad_lse_t):
    """Only the student gets a gradient: the teacher is a constant (and the log-sum-exps are internal)."""
    student, teacher, lse_s, lse_t, keep = ctx.saved_tensors
    scale = _row_scale(grad_loss.float() * ctx.inv_temperature, keep, student.shape[0])
    gradient = getattr(ctx, "gradient", _kl_div_rows_backward_op)   # the op, as tracers must see it, unless eager
    grad = gradient(student, teacher, lse_s, lse_t, scale, ctx.inv_temperature, ctx.backend)
    return grad, None, None, None, None


_kl_div_rows_op.register_autograd(_rows_backward, setup_context=_setup_context)


class _KLRows(torch.autograd.Function):
    """The eager twin of forge::kl_div_rows: the same kernels, forward and backward, without the custom op's
    dispatch and autograd wrappers (about 100 us a call: benchmarks/op_overhead.py). torch.compile sees the op."""

    @staticmethod
    def forward(ctx, student, teacher, inv_temperature, keep, backend):
        output = tuple(kernels_for(student.device, backend).forward(student, teacher, inv_temperature, keep))
        _setup_context(ctx, (student, teacher, inv_temperature, keep, backend), output)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.gradient = _rows_gradient
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_lse_s, grad_lse_t):
        return _rows_backward(ctx, grad_loss, grad_lse_s, grad_lse_t)


class _KLLoss(torch.autograd.Function):
    """The reduced loss in eager mode on a backend with its own reduction (KLKernels.reduce): the row kernels and
    the native reduction forward, the row-gradient kernel backward with every kept row weighted grad / divisor."""

    @staticmethod
    def forward(ctx, student, teacher, inv_temperature, keep, reduction, kernels):
        loss, lse_s, lse_t = kernels.forward(student, teacher, inv_temperature, keep)
        total, divisor = kernels.reduce(loss, keep, student.shape[1], reduction)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, keep)
        ctx.inv_temperature, ctx.divisor, ctx.kernels = inv_temperature, divisor, kernels
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student, teacher, lse_s, lse_t, keep = ctx.saved_tensors
        scale = _row_scale(grad_total.float() * (ctx.inv_temperature / ctx.divisor), keep, student.shape[0])
        grad = _gradient(ctx.kernels, student, teacher, lse_s, lse_t, scale, ctx.inv_temperature)
        return grad, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------

def kl_div_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None, reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) over the last dim, from raw logits.

    Args:
        student_logits, teacher_logits: (..., vocab), same shape, device and dtype (float32, bfloat16,
            float16). Math in float32; the result has the student's dtype, as F.kl_div.
        temperature: T > 0. The loss is not multiplied by T^2 (do that yourself for Hinton's scaling).
        mask: bool, the logits' shape without the vocabulary; rows where it is False are ignored.
        reduction: "none" (one value per row, shape logits.shape[:-1], 0 on masked rows: not torch's
            per-element output, which would cost rows x vocab memory), "sum", "batchmean" (sum / kept
            rows) or "mean" (sum / (kept rows * vocab), torch's every-element mean). With every row
            masked the sum is 0, and so are batchmean, mean and the gradient.
        backend: "auto", "torch" (the reference), "cpu", "triton" or "cuda".
    Differentiable with respect to the student only: the teacher is a constant, and no gradient reaches
    it even when it requires grad. Extra memory O(rows) besides the student's gradient. NaN or Inf in a
    kept row gives NaN (or Inf) in the loss, never hidden.
    """
    _check_logits(student_logits, teacher_logits)
    temperature = check_finite_number("temperature", temperature, low=0.0, low_open=True)
    mask = None if mask is None else check_mask(mask, student_logits.shape[:-1], student_logits.device)
    reduction = check_reduction(reduction)
    return kernels_for(student_logits.device, backend)(student_logits, teacher_logits, temperature, mask, reduction)
