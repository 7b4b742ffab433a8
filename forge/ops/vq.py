"""Vector-quantized weights (the VPTQ layout: Liu et al. 2024, "VPTQ: Extreme Low-bit Vector Post-Training
Quantization for LLMs", arXiv 2409.17066; microsoft/VPTQ): decode and the fused linear layer.

W (out, in) is cut, column by column, into vectors of v consecutive output rows (the GPTQ-style encoder
quantizes one input column at a time, so a column's vectors are quantized together). With G = ceil(out / v):
    W[g v + r, j] = scale[j] * (codebook[idx[g, j]][r] + res_codebook[res_idx[g, j]][r])
(the residual term only when a residual codebook is given; rows past `out` are dropped). idx, res_idx: int32
(G, in); codebooks float32 (k, v); scale float32 (in,). Dequantization as VPTQ's: scale * (C[idx] + C_res[res]).
`vq_linear` computes y = x W^T; its `cpu` kernel rebuilds v rows of W at a time and never holds W whole.
The encoder (Hessian-weighted k-means, GPTQ error feedback) is forge.nn.compress.vptq.
"""
from __future__ import annotations

import torch

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_positive_int

MAX_V = 64  # the cpu vq_linear keeps one codeword and its accumulators in registers


# ---------------------------------------------------------------------------------------------
# References (plain PyTorch; they define the ops)
# ---------------------------------------------------------------------------------------------

def vq_decode_reference(idx, codebook, scale, out_features: int, res_idx=None, res_codebook=None) -> torch.Tensor:
    """W (out_features, in) float32 from the codes (module docstring)."""
    vectors = codebook[idx.long()]                             # (G, in, v)
    if res_idx is not None:
        vectors = vectors + res_codebook[res_idx.long()]
    w = vectors.permute(0, 2, 1).reshape(-1, idx.shape[1])[:out_features]
    return w * scale[None, :]


def vq_linear_reference(x, idx, codebook, scale, out_features: int, res_idx=None, res_codebook=None):
    """y = x W^T with W decoded whole."""
    w = vq_decode_reference(idx, codebook, scale, out_features, res_idx, res_codebook)
    return (x.float() @ w.T).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Backend launchers: decode (idx, codebook, scale, out_features, res_idx, res_codebook) -> W;
# linear (x2d, idx, codebook, scale, out_features, res_idx, res_codebook) -> y2d.
# ---------------------------------------------------------------------------------------------

def _new_output(shape, dtype, device) -> torch.Tensor:
    """Output buffers of the native launchers (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


_dispatch.register("vq_decode", "torch")(vq_decode_reference)
_dispatch.register("vq_linear", "torch")(vq_linear_reference)


def _pointers(idx, codebook, scale, res_idx, res_codebook):
    idx, codebook, scale = idx.contiguous(), codebook.contiguous(), scale.contiguous()
    if res_idx is None:
        return (idx, codebook, None, None, scale), (idx.data_ptr(), codebook.data_ptr(), 0, 0, scale.data_ptr())
    res_idx, res_codebook = res_idx.contiguous(), res_codebook.contiguous()
    return ((idx, codebook, res_idx, res_codebook, scale),
            (idx.data_ptr(), codebook.data_ptr(), res_idx.data_ptr(), res_codebook.data_ptr(), scale.data_ptr()))


@_dispatch.register("vq_decode", "cpu")
def _decode_cpu(idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    alive, ptrs = _pointers(idx, codebook, scale, res_idx, res_codebook)
    w = _new_output((out_features, idx.shape[1]), torch.float32, idx.device)
    _native.cpu_module().vq_decode(*ptrs, out_features, idx.shape[1], codebook.shape[1], w.data_ptr(),
                                   torch.get_num_threads())
    return w


@_dispatch.register("vq_linear", "cpu")
def _linear_cpu(x, idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    alive, ptrs = _pointers(idx, codebook, scale, res_idx, res_codebook)
    xf = x.float().contiguous()
    y = _new_output((xf.shape[0], out_features), torch.float32, x.device)
    _native.cpu_module().vq_linear(xf.data_ptr(), xf.shape[0], *ptrs[:4], ptrs[4], out_features, idx.shape[1],
                                   codebook.shape[1], y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


@_dispatch.register("vq_decode", "triton")
def _decode_triton(idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    from forge.kernels.vq import vq_decode_triton

    keep, _alive = _pointers(idx, codebook, scale, res_idx, res_codebook)
    return vq_decode_triton(keep[0], keep[1], keep[4], out_features, keep[2], keep[3])


@_dispatch.register("vq_linear", "triton")
def _linear_triton(x, idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    from forge.kernels.vq import vq_linear_triton

    keep, _alive = _pointers(idx, codebook, scale, res_idx, res_codebook)
    y = vq_linear_triton(x.contiguous(), keep[0], keep[1], keep[4], out_features, keep[2], keep[3])
    return y.to(x.dtype)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@_dispatch.register("vq_decode", "cuda")
def _decode_cuda(idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    alive, ptrs = _pointers(idx, codebook, scale, res_idx, res_codebook)
    w = _new_output((out_features, idx.shape[1]), torch.float32, idx.device)
    _native.cuda_module().vq_decode(*ptrs, out_features, idx.shape[1], codebook.shape[1], w.data_ptr(),
                                    _stream(idx.device))
    return w


@_dispatch.register("vq_linear", "cuda")
def _linear_cuda(x, idx, codebook, scale, out_features, res_idx=None, res_codebook=None):
    alive, ptrs = _pointers(idx, codebook, scale, res_idx, res_codebook)
    xf = x.float().contiguous()
    y = _new_output((xf.shape[0], out_features), torch.float32, x.device)
    _native.cuda_module().vq_linear(xf.data_ptr(), xf.shape[0], *ptrs, out_features, idx.shape[1], codebook.shape[1],
                                    y.data_ptr(), _stream(x.device))
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _check_index(name, idx, book_name, book, groups=None, columns=None) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32 or idx.dim() != 2 or idx.numel() == 0:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name} must be a non-empty 2-dim int32 tensor (groups, in_features); got {got}")
    if not isinstance(book, torch.Tensor) or book.dtype != torch.float32 or book.dim() != 2 or book.numel() == 0:
        got = f"{book.dtype} {tuple(book.shape)}" if isinstance(book, torch.Tensor) else type(book).__name__
        raise TypeError(f"{book_name} must be a non-empty 2-dim float32 tensor (k, v); got {got}")
    if groups is not None and tuple(idx.shape) != (groups, columns):
        raise ValueError(f"{name} must have shape {(groups, columns)}; got {tuple(idx.shape)}")
    if idx.device.type != "meta" and bool(((idx < 0) | (idx >= book.shape[0])).any()):
        raise ValueError(f"{name} holds indices outside 0..{book.shape[0] - 1} ({book_name} has {book.shape[0]} rows)")


def _check_codes(idx, codebook, scale, out_features, res_idx, res_codebook) -> None:
    check_positive_int("out_features", out_features)
    _check_index("idx", idx, "codebook", codebook)
    v = codebook.shape[1]
    if v > MAX_V:
        raise ValueError(f"codebook vectors must have at most {MAX_V} values; got v={v}")
    if idx.shape[0] != -(-out_features // v):
        raise ValueError(f"idx has {idx.shape[0]} row groups; out_features={out_features} in vectors of v={v} "
                         f"needs {-(-out_features // v)}")
    if (res_idx is None) != (res_codebook is None):
        raise ValueError("res_idx and res_codebook come together: give both or neither")
    if res_idx is not None:
        _check_index("res_idx", res_idx, "res_codebook", res_codebook, *idx.shape)
        if res_codebook.shape[1] != v:
            raise ValueError(f"res_codebook vectors have {res_codebook.shape[1]} values; codebook's have {v}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (idx.shape[1],):
        raise ValueError(f"scale must be a float32 tensor of shape ({idx.shape[1]},) (one per input feature); "
                         f"got {getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    tensors = [t for t in (idx, codebook, scale, res_idx, res_codebook) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"idx, codebook, scale (and residuals) must share a device; got {[str(t.device) for t in tensors]}")


# ---------------------------------------------------------------------------------------------
# torch.library ops and public API
# ---------------------------------------------------------------------------------------------

def _run_decode(idx, codebook, scale, out_features, res_idx, res_codebook, backend):
    fn = _dispatch.resolve("vq_decode", idx.device, backend)
    return fn(idx, codebook, scale, out_features, res_idx, res_codebook)


def _run_linear(x, idx, codebook, scale, out_features, res_idx, res_codebook, backend):
    fn = _dispatch.resolve("vq_linear", x.device, backend)
    y = fn(x.reshape(-1, x.shape[-1]), idx, codebook, scale, out_features, res_idx, res_codebook)
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("forge::vq_decode", mutates_args=())
def _decode_op(idx: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, out_features: int,
               res_idx: torch.Tensor | None, res_codebook: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _run_decode(idx, codebook, scale, out_features, res_idx, res_codebook, backend).clone()


@_decode_op.register_fake
def _(idx, codebook, scale, out_features, res_idx, res_codebook, backend):
    return codebook.new_empty((out_features, idx.shape[1]))


@torch.library.custom_op("forge::vq_linear", mutates_args=())
def _linear_op(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, out_features: int,
               res_idx: torch.Tensor | None, res_codebook: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _run_linear(x, idx, codebook, scale, out_features, res_idx, res_codebook, backend).clone()


@_linear_op.register_fake
def _(x, idx, codebook, scale, out_features, res_idx, res_codebook, backend):
    return x.new_empty(*x.shape[:-1], out_features)


def vq_decode(idx: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, out_features: int,
              res_idx: torch.Tensor | None = None, res_codebook: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """W (out_features, in) float32 = scale[j] * (codebook[idx] + res_codebook[res_idx]) (module docstring)."""
    _check_codes(idx, codebook, scale, out_features, res_idx, res_codebook)
    return _dispatch.call_op(_decode_op, _run_decode, idx, codebook, scale, out_features, res_idx, res_codebook,
                             backend)


def vq_linear(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, out_features: int,
              res_idx: torch.Tensor | None = None, res_codebook: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """y = x W^T (..., out_features) with W the VQ weight (never materialized by the `cpu` kernel); inference
    only; y has x's dtype, accumulated in float32."""
    _check_codes(idx, codebook, scale, out_features, res_idx, res_codebook)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float tensor (..., in_features); got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != idx.shape[1]:
        raise ValueError(f"x must end in in_features={idx.shape[1]}; got shape {tuple(x.shape)}")
    if x.device != idx.device:
        raise ValueError(f"x is on {x.device} but idx is on {idx.device}")
    return _dispatch.call_op(_linear_op, _run_linear, x, idx, codebook, scale, out_features, res_idx, res_codebook,
                             backend)

