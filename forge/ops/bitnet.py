"""BitNet b1.58 quantization (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv 2402.17764, and its
"Training Tips, Code and FAQ" note), straight-through gradients, 2-bit packing and the ternary matmul.

Weights (absmean, per tensor or per output row):  scale = max(mean|W|, eps),  q = clamp(round(W / scale), -1, 1)
Activations (absmax, per token = last dim):        s = max(max|x|, eps) / 127,  q = clamp(round(x / s), -127, 127)
Dequantized values are q * scale. round is half-to-even (torch.round); every backend computes in float32,
the weight mean accumulates in float64 (so backends agree up to values within an ulp of a rounding tie).

STE (straight-through estimator, Bengio et al. 2013, as in the paper): `ste_ternary` / `ste_act_int8` return
the dequantized values in the forward and pass the incoming gradient unchanged in the backward.

Packing: 4 weights a byte, 2 bits each, code q + 1 in {0, 1, 2}, planar layout: with kb = ceil(in/4), weight
k of a row is byte k % kb, bits 2 * (k // kb). Each quarter of a row is then a contiguous activation slice,
so a kernel decodes a byte with shifts and masks against four contiguous int8 streams (no gather).
"""
from __future__ import annotations

import weakref

import torch

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_finite_number, check_float_tensor, check_positive_int

EPS = 1e-5  # the paper's code: clamp_(min=1e-5) on both scales


# ---------------------------------------------------------------------------------------------
# References (plain PyTorch; they define the ops)
# ---------------------------------------------------------------------------------------------

def _groups(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """w as (groups, group_size): one group per output row, or one for the whole tensor."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def absmean_scale(abs_sums: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """float32 max(sum|w| / count, eps) from float64-accumulated sums; NaN stays NaN."""
    return (abs_sums.double() / count).float().clamp_min(eps)


def ternary_quant_reference(w: torch.Tensor, per_channel: bool = False, eps: float = EPS):
    """(q int8 of w's shape, scale float32: shape () or (rows,))."""
    rows = _groups(w.float(), per_channel)
    scale = absmean_scale(rows.abs().sum(dim=1, dtype=torch.float64), rows.shape[1], eps)
    q = torch.round(rows / scale[:, None]).clamp(-1, 1).to(torch.int8).reshape(w.shape)
    return q, (scale if per_channel else scale.reshape(()))


def ste_ternary_reference(w: torch.Tensor, per_channel: bool = False, eps: float = EPS) -> torch.Tensor:
    """The dequantized ternary weight q * scale, in w's dtype."""
    q, scale = ternary_quant_reference(w, per_channel, eps)
    return (_groups(q.float(), per_channel) * scale.reshape(-1, 1)).reshape(w.shape).to(w.dtype)


def act_quant_int8_reference(x: torch.Tensor, eps: float = EPS):
    """(q int8 of x's shape, scale float32 of shape x.shape[:-1]), per token over the last dim.

    A row holding NaN or Inf gets a NaN or Inf scale and q = 0 (x / scale is NaN or 0 there), so its
    dequantized values q * scale, and its ternary_linear outputs, are NaN."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(eps) / 127.0
    return torch.round(xf / scale[..., None]).clamp(-127, 127).nan_to_num(0.0).to(torch.int8), scale


def ste_act_int8_reference(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    q, scale = act_quant_int8_reference(x, eps)
    return (q.float() * scale[..., None]).to(x.dtype)


def pack_ternary_reference(q: torch.Tensor) -> torch.Tensor:
    """int8 (rows, k) in {-1, 0, 1} -> uint8 (rows, ceil(k / 4)), planar layout (module docstring)."""
    kb = (q.shape[1] + 3) // 4
    codes = torch.ones(q.shape[0], 4 * kb, dtype=torch.uint8, device=q.device)  # padding: code 1 = weight 0
    codes[:, :q.shape[1]] = (q + 1).to(torch.uint8)
    codes = codes.view(q.shape[0], 4, kb)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary_reference(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (rows, kb) -> int8 (rows, in_features); the exact inverse of pack_ternary."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None, :] >> shifts[None, :, None]) & 3
    return (codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1)


def ternary_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int,
                             eps: float = EPS) -> torch.Tensor:
    """y = x . W^T with x quantized per token: y = (sum_k q_x q_w) * s_x * scale (exact integer sums:
    float32 holds them while 127 * in_features < 2**24)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = act_quant_int8_reference(x2, eps)
    w = unpack_ternary_reference(packed, x.shape[-1]).float()
    y = (xq.float() @ w.T) * xs[:, None] * scale.float().reshape(-1).expand(out_features)[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------
# Backend launchers. Signatures: ternary (w, per_channel, eps, dequantize) -> (out of w's shape, scale (groups,));
# act (x (..., k), eps, dequantize) -> (out of x's shape, scale x.shape[:-1] or None when dequantize);
# pack (q2d); unpack (packed, in_features); linear (x (..., k), packed, scale with 1 or n values, eps) -> y (..., n).
# act and linear give rows of x holding NaN or Inf as the reference does: q = 0, dequantized values and y NaN.
# ---------------------------------------------------------------------------------------------

def _register(ops: tuple[str, ...], backend: str, needs_native: bool = True):
    def wrap(fn):
        for op in ops:
            _dispatch.register(op, backend, needs_native)(fn)
        return fn
    return wrap


TERNARY_OPS, ACT_OPS = ("ternary_quant", "ste_ternary"), ("act_quant_int8", "ste_act_int8")


@_register(TERNARY_OPS, "torch")
def _ternary_torch(w, per_channel, eps, dequantize):
    if dequantize:
        return ste_ternary_reference(w, per_channel, eps), None
    q, scale = ternary_quant_reference(w, per_channel, eps)
    return q, scale.reshape(-1)


@_register(ACT_OPS, "torch")
def _act_torch(x, eps, dequantize):
    if dequantize:
        return ste_act_int8_reference(x, eps), None
    return act_quant_int8_reference(x, eps)


@_register(("pack_ternary",), "torch")
def _pack_torch(q):
    return pack_ternary_reference(q)


@_register(("unpack_ternary",), "torch")
def _unpack_torch(packed, in_features):
    return unpack_ternary_reference(packed, in_features)


@_register(("ternary_linear",), "torch")
def _linear_torch(x, packed, scale, eps):
    return ternary_linear_reference(x, packed, scale, packed.shape[0], eps)


def _threads() -> int:
    return torch.get_num_threads()


@_register(TERNARY_OPS, "cpu")
def _ternary_cpu(w, per_channel, eps, dequantize):
    w = w.contiguous()
    groups = w.shape[0] if per_channel else 1
    scale = torch.empty(groups, dtype=torch.float32, device=w.device)
    out = torch.empty_like(w, dtype=None if dequantize else torch.int8)  # w is contiguous: so is out
    _native.cpu_module().ternary_quant(w.data_ptr(), _native.dtype_code(w), groups, w.numel() // groups, eps,
                                       scale.data_ptr(), out.data_ptr(), dequantize, _threads())
    return out, scale


@_register(ACT_OPS, "cpu")
def _act_cpu(x, eps, dequantize):
    x, cols = x.contiguous(), x.shape[-1]
    rows = x.numel() // cols
    # Sizes as ints: a torch.Size argument costs ~3 us more. The dequantized output needs no scale (pointer 0).
    scale = None if dequantize else torch.empty(rows, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x, dtype=None if dequantize else torch.int8)
    _native.cpu_module().act_quant(x.data_ptr(), _native.dtype_code(x), rows, cols, eps,
                                   0 if dequantize else scale.data_ptr(), out.data_ptr(), cols, dequantize, _threads())
    if dequantize or x.dim() == 2:
        return out, scale
    return out, scale.view(x.shape[:-1])


@_register(("pack_ternary",), "cpu")
def _pack_cpu(q):
    q = q.contiguous()
    packed = torch.empty(q.shape[0], (q.shape[1] + 3) // 4, dtype=torch.uint8)
    _native.cpu_module().pack_ternary(q.data_ptr(), q.shape[0], q.shape[1], packed.data_ptr(), _threads())
    return packed


@_register(("unpack_ternary",), "cpu")
def _unpack_cpu(packed, in_features):
    packed = packed.contiguous()
    q = torch.empty(packed.shape[0], in_features, dtype=torch.int8)
    _native.cpu_module().unpack_ternary(packed.data_ptr(), packed.shape[0], in_features, q.data_ptr(), _threads())
    return q


@_register(("ternary_linear",), "cpu")
def _linear_cpu(x, packed, scale, eps):
    x, packed, scale = x.contiguous(), packed.contiguous(), scale.contiguous()
    k, n = x.shape[-1], packed.shape[0]
    if x.dim() == 2:  # int sizes for the usual 2-dim x: a tuple argument costs ~1 us more
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _native.cpu_module().ternary_linear(x.data_ptr(), _native.dtype_code(x), x.numel() // k, k, packed.data_ptr(),
                                        n, scale.data_ptr(), int(scale.numel() > 1), eps, y.data_ptr(), _threads())
    return y


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@_register(TERNARY_OPS, "cuda")
def _ternary_cuda(w, per_channel, eps, dequantize):
    mod, w = _native.cuda_module(), w.contiguous()
    groups = w.shape[0] if per_channel else 1
    size = w.numel() // groups
    partial = torch.empty(groups * -(-size // mod.ternary_block_values()), dtype=torch.float32, device=w.device)
    scale = torch.empty(groups, dtype=torch.float32, device=w.device)
    out = torch.empty_like(w) if dequantize else torch.empty(w.shape, dtype=torch.int8, device=w.device)
    mod.ternary_quant(w.data_ptr(), _native.dtype_code(w), groups, size, eps, scale.data_ptr(), partial.data_ptr(),
                      out.data_ptr(), dequantize, _stream(w.device))
    return out, scale


def _act_cuda_into(x, eps, out, out_stride, dequantize):
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _native.cuda_module().act_quant(x.data_ptr(), _native.dtype_code(x), x.shape[0], x.shape[1], eps,
                                    scale.data_ptr(), out.data_ptr(), out_stride, dequantize, _stream(x.device))
    return out, scale


@_register(ACT_OPS, "cuda")
def _act_cuda(x, eps, dequantize):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2) if dequantize else torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    return _rows_as_reference(x, *_act_cuda_into(x2, eps, out, x2.shape[1], dequantize), dequantize)


@_register(("ternary_linear",), "cuda")
def _linear_cuda(x, packed, scale, eps):
    return _rows_of(x, _linear_cuda_2d(x.reshape(-1, x.shape[-1]), packed, scale.reshape(-1), eps))


def _linear_cuda_2d(x, packed, scale, eps):
    x, packed, scale = x.contiguous(), packed.contiguous(), scale.contiguous()
    kb = packed.shape[1]
    xq = torch.zeros(x.shape[0], 4 * kb, dtype=torch.int8, device=x.device)
    _, xs = _act_cuda_into(x, eps, xq, 4 * kb, False)
    y = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    _native.cuda_module().ternary_linear(xq.data_ptr(), xs.data_ptr(), x.shape[0], kb, packed.data_ptr(),
                                         packed.shape[0], scale.data_ptr(), int(scale.numel() > 1),
                                         _native.dtype_code(x), y.data_ptr(), _stream(x.device))
    return y


@_register(TERNARY_OPS, "triton")
def _ternary_triton(w, per_channel, eps, dequantize):
    from forge.kernels.bitnet import abs_partial_sums_triton, ternary_apply_triton

    w = w.contiguous()
    groups = w.shape[0] if per_channel else 1
    partial = abs_partial_sums_triton(w, groups)
    scale = absmean_scale(partial.sum(dim=1, dtype=torch.float64), w.numel() // groups, eps)
    return ternary_apply_triton(w, scale, groups, dequantize), scale


@_register(ACT_OPS, "triton")
def _act_triton(x, eps, dequantize):
    from forge.kernels.bitnet import act_quant_triton

    out, scale = act_quant_triton(x.reshape(-1, x.shape[-1]).contiguous(), eps, dequantize)
    return _rows_as_reference(x, out, scale, dequantize)


@_register(("ternary_linear",), "triton")
def _linear_triton(x, packed, scale, eps):
    from forge.kernels.bitnet import ternary_linear_triton

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _rows_of(x, ternary_linear_triton(x2, packed.contiguous(), scale.reshape(-1).contiguous(), eps))


def _rows_as_reference(x, out, scale, dequantize):
    """A GPU or Triton act kernel's (rows, k) results in x's shape, rows whose scale is NaN or Inf (x held NaN or
    Inf) as the reference has them: q = 0, q * scale = NaN. Those kernels clamp a NaN ratio to -127 instead; one
    masked pass fixes that without a sync (the cpu kernel writes such rows itself)."""
    out = out.masked_fill(~torch.isfinite(scale).reshape(-1, 1), float("nan") if dequantize else 0)
    return out.reshape(x.shape), (None if dequantize else scale.reshape(x.shape[:-1]))


def _rows_of(x, y):
    """A GPU or Triton linear kernel's (rows, n) output in x's leading shape; a token row of x holding NaN or Inf
    gives NaN outputs, as in the reference (those kernels may give +-Inf; the cpu kernel gives NaN itself)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = y.masked_fill(~torch.isfinite(x2).all(dim=1, keepdim=True), float("nan"))
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _check_quant_input(name: str, t, eps) -> float:
    check_float_tensor(name, t)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one value")
    return check_finite_number("eps", eps, low=0.0, low_open=True)


def _check_weight(w, per_channel, eps) -> float:
    eps = _check_quant_input("w", w, eps)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {type(per_channel).__name__}")
    if per_channel and w.dim() < 2:
        raise ValueError(f"per_channel=True needs w with at least 2 dims (out_features, ...); got shape {tuple(w.shape)}")
    return eps


def _check_activation(x, eps) -> float:
    eps = _check_quant_input("x", x, eps)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., features); got a 0-dim tensor")
    return eps


def _check_packed(packed, in_features: int, out_features: int | None = None) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a 2-dim uint8 tensor (from pack_ternary); got {got}")
    if packed.shape[1] != (in_features + 3) // 4:
        raise ValueError(f"packed has {packed.shape[1]} bytes a row; in_features={in_features} needs "
                         f"ceil({in_features} / 4) = {(in_features + 3) // 4}")
    if out_features is not None and packed.shape[0] != out_features:
        raise ValueError(f"out_features={out_features} but packed has {packed.shape[0]} rows")


_CHECKED_CODES: dict[int, tuple] = {}   # id(packed) -> (weakref, version, data_ptr, in_features) that passed


def _codes_known_good(packed, in_features: int) -> bool:
    entry = _CHECKED_CODES.get(id(packed))
    return (entry is not None and entry[0]() is packed
            and entry[1:] == (packed._version, packed.data_ptr(), in_features))


def _remember_good_codes(packed, in_features: int) -> None:
    key = id(packed)
    ref = weakref.ref(packed, lambda _ref: _CHECKED_CODES.pop(key, None))
    _CHECKED_CODES[key] = (ref, packed._version, packed.data_ptr(), in_features)


def _check_packed_codes(packed, in_features: int, what: str) -> None:
    """Refuse bytes that pack_ternary never writes: the 2-bit code 3, or a nonzero weight (a code other than 1)
    in the padding past `in_features`, which means the weight was packed with more features than `what` says
    (21 or 23 features share 6 bytes a row with 24). One vectorized pass over packed (a host sync on a GPU),
    once per tensor: a packed weight that passed is not read again until it is written in place (its version
    counter moves), so a frozen BitLinear pays the check on its first call only."""
    if packed.device.type == "meta":
        raise ValueError("packed is a meta tensor (a shape without values); its codes cannot be checked")
    if _codes_known_good(packed, in_features):
        return
    kb = packed.shape[1]
    code3 = (packed & (packed >> 1) & 0x55).any()  # both bits of some 2-bit field set
    pads = [(packed[:, k % kb] >> (2 * (k // kb))) & 3 for k in range(in_features, 4 * kb)]
    padded = (torch.stack(pads) != 1).any() if pads else torch.zeros((), dtype=torch.bool, device=packed.device)
    has_code3, has_padding_weight = torch.stack([code3, padded]).tolist()
    if has_code3:
        raise ValueError("packed holds the invalid 2-bit code 3; pack_ternary writes only codes 0, 1 and 2 "
                         "(weights -1, 0 and 1)")
    if has_padding_weight:
        raise ValueError(f"packed holds nonzero weights past {what}: it was packed from a weight with more "
                         f"input features (up to {4 * kb})")
    _remember_good_codes(packed, in_features)


def _check_linear(x, packed, scale, out_features, eps) -> float:
    eps = _check_activation(x, eps)
    check_positive_int("out_features", out_features)
    _check_packed(packed, x.shape[-1], out_features)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"scale must be a float32 tensor (from ternary_quant); got {getattr(scale, 'dtype', type(scale).__name__)}")
    if scale.numel() not in (1, out_features):
        raise ValueError(f"scale must hold 1 or out_features={out_features} values; got shape {tuple(scale.shape)}")
    device = x.device
    if packed.device != device or scale.device != device:
        name, t = ("packed", packed) if packed.device != device else ("scale", scale)
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return eps


# ---------------------------------------------------------------------------------------------
# torch.library ops (what torch.compile sees); eager calls skip the wrapper and run the same code
# ---------------------------------------------------------------------------------------------

def _run_ternary(w, per_channel, eps, backend, dequantize=False):
    op = "ste_ternary" if dequantize else "ternary_quant"
    out, scale = _dispatch.resolve(op, w.device, backend)(w, per_channel, eps, dequantize)
    return out, scale


def _run_act(x, eps, backend, dequantize=False):
    op = "ste_act_int8" if dequantize else "act_quant_int8"
    return _dispatch.resolve(op, x.device, backend)(x, eps, dequantize)


@torch.library.custom_op("forge::ternary_quant", mutates_args=())
def _ternary_quant_op(w: torch.Tensor, per_channel: bool, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _run_ternary(w, per_channel, eps, backend)
    return q.contiguous(), scale.reshape(-1).clone()


@_ternary_quant_op.register_fake
def _(w, per_channel, eps, backend):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0] if per_channel else 1, dtype=torch.float32)


@torch.library.custom_op("forge::act_quant_int8", mutates_args=())
def _act_quant_op(x: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _run_act(x, eps, backend)
    return q.contiguous(), scale.contiguous()


@_act_quant_op.register_fake
def _(x, eps, backend):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("forge::ste_ternary", mutates_args=())
def _ste_ternary_op(w: torch.Tensor, per_channel: bool, eps: float, backend: str) -> torch.Tensor:
    return _run_ternary(w, per_channel, eps, backend, dequantize=True)[0].contiguous()


@torch.library.custom_op("forge::ste_act_int8", mutates_args=())
def _ste_act_op(x: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _run_act(x, eps, backend, dequantize=True)[0].contiguous()


@_ste_ternary_op.register_fake
def _(w, per_channel, eps, backend):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@_ste_act_op.register_fake
def _(x, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _identity_backward(ctx, grad):
    """Straight-through: the gradient with respect to the latent input is the incoming gradient."""
    return (grad,) + (None,) * ctx.n_extra


def _setup_ste(n_extra):
    def setup(ctx, inputs, output):
        ctx.n_extra = n_extra
    return setup


_ste_ternary_op.register_autograd(_identity_backward, setup_context=_setup_ste(3))
_ste_act_op.register_autograd(_identity_backward, setup_context=_setup_ste(2))


@torch.library.custom_op("forge::ternary_linear", mutates_args=())
def _ternary_linear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int, eps: float,
                       backend: str) -> torch.Tensor:
    return _linear_dispatch(x, packed, scale, out_features, eps, backend)


@_ternary_linear_op.register_fake
def _(x, packed, scale, out_features, eps, backend):
    return x.new_empty(*x.shape[:-1], out_features)


def _linear_dispatch(x, packed, scale, out_features, eps, backend):
    _check_packed_codes(packed, x.shape[-1], f"x's {x.shape[-1]} features")
    return _dispatch.resolve("ternary_linear", x.device, backend)(x, packed, scale, eps)


class _StraightThrough(torch.autograd.Function):
    """Eager STE: forward(x) = quantize-dequantize(x) by the dispatched kernel, backward = identity."""

    @staticmethod
    def forward(ctx, x, run):
        return run(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# Eager implementations, with the signatures of the torch.library ops (for _dispatch.call_op).

def _ste_ternary_eager(w, per_channel, eps, backend):
    if not _dispatch.needs_autograd(w):  # no graph to record: the Function would only add its overhead
        return _run_ternary(w, per_channel, eps, backend, dequantize=True)[0]
    return _StraightThrough.apply(w, lambda t: _run_ternary(t, per_channel, eps, backend, dequantize=True)[0])


def _ste_act_eager(x, eps, backend):
    if not _dispatch.needs_autograd(x):
        return _run_act(x, eps, backend, dequantize=True)[0]
    return _StraightThrough.apply(x, lambda t: _run_act(t, eps, backend, dequantize=True)[0])


def _pack_eager(q, backend):
    return _dispatch.resolve("pack_ternary", q.device, backend)(q)


def _unpack_eager(packed, in_features, backend):
    return _dispatch.resolve("unpack_ternary", packed.device, backend)(packed, in_features)


# pack and unpack are not torch.library ops: under torch.compile the reference is traced instead.

def _pack_traced(q, backend):
    return pack_ternary_reference(q)


def _unpack_traced(packed, in_features, backend):
    return unpack_ternary_reference(packed, in_features)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def ternary_quant(w: torch.Tensor, per_channel: bool = False, eps: float = EPS, backend: str = "auto"):
    """Absmean ternary quantization: (q int8 in {-1, 0, 1} of w's shape, scale float32).

    scale = max(mean|w|, eps) over the whole tensor (shape ()) or, with per_channel, over each output
    row w[i] (shape (w.shape[0],)); q = clamp(round(w / scale), -1, 1); w ~ q * scale.
    NaN anywhere in a group makes its scale NaN (q is then meaningless), so the NaN reaches q * scale.
    """
    eps = _check_weight(w, per_channel, eps)
    q, scale = _dispatch.call_op(_ternary_quant_op, _run_ternary, w, per_channel, eps, backend)
    return q, (scale if per_channel else scale.squeeze())  # q has w's shape, scale (groups,) from every backend


def act_quant_int8(x: torch.Tensor, eps: float = EPS, backend: str = "auto"):
    """Per-token absmax int8 quantization over the last dim: (q int8 of x's shape, scale float32 x.shape[:-1]).

    scale = max(max|x|, eps) / 127, q = clamp(round(x / scale), -127, 127); x ~ q * scale.
    A token holding NaN or Inf gets a NaN or Inf scale and q = 0 on every backend (so q * scale is NaN).
    """
    eps = _check_activation(x, eps)
    return _dispatch.call_op(_act_quant_op, _run_act, x, eps, backend)


def ste_ternary(w: torch.Tensor, per_channel: bool = False, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """q * scale of `ternary_quant` in w's dtype, with the identity gradient (straight-through) to w."""
    eps = _check_weight(w, per_channel, eps)
    return _dispatch.call_op(_ste_ternary_op, _ste_ternary_eager, w, per_channel, eps, backend)


def ste_act_int8(x: torch.Tensor, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """q * scale of `act_quant_int8` in x's dtype, with the identity gradient (straight-through) to x."""
    eps = _check_activation(x, eps)
    return _dispatch.call_op(_ste_act_op, _ste_act_eager, x, eps, backend)


def pack_ternary(q: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """int8 (out_features, in_features) in {-1, 0, 1} -> uint8 (out_features, ceil(in_features / 4))."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor (from ternary_quant); got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 2 or q.numel() == 0:
        raise ValueError(f"q must be 2-dim (out_features, in_features) and non-empty; got shape {tuple(q.shape)}")
    if q.device.type == "meta":
        raise ValueError("q is a meta tensor (a shape without values); pack_ternary needs a tensor with data")
    if bool(((q < -1) | (q > 1)).any()):  # not q.abs() > 1: abs(-128) overflows int8 to -128
        raise ValueError("q must hold only -1, 0 and 1")
    return _dispatch.call_op(_pack_traced, _pack_eager, q, backend)


def unpack_ternary(packed: torch.Tensor, in_features: int, backend: str = "auto") -> torch.Tensor:
    """The exact inverse of `pack_ternary`: uint8 (rows, ceil(in_features / 4)) -> int8 (rows, in_features)."""
    check_positive_int("in_features", in_features)
    _check_packed(packed, in_features)
    if not torch.compiler.is_compiling():
        _check_packed_codes(packed, in_features, f"in_features={in_features}")
    return _dispatch.call_op(_unpack_traced, _unpack_eager, packed, in_features, backend)


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int, eps: float = EPS,
                   backend: str = "auto") -> torch.Tensor:
    """y = x . W^T (..., out_features) from packed ternary W without unpacking it to floats: x is quantized
    per token to int8 (`act_quant_int8`), dot products accumulate in int32 from the decoded 2-bit codes,
    y = acc * s_x * scale. scale: float32 with 1 value (per tensor) or out_features values (per row).
    Inference only (no gradient); y has x's dtype. A token of x holding NaN or Inf gives NaN outputs.
    packed is checked on its first use and after every in-place write (one pass, a host sync on a GPU): the
    invalid code 3, or nonzero weights in the padding past x's features (x narrower than the packed weight,
    e.g. 21 or 23 features on 24), are refused.
    """
    eps = _check_linear(x, packed, scale, out_features, eps)
    return _dispatch.call_op(_ternary_linear_op, _linear_dispatch, x, packed, scale, out_features, eps, backend)
