"""Newton-Schulz orthogonalization, the inner loop of Muon.

    X0 = G / (||G||_F + eps)            per matrix, transposed first when tall (work on the short side)
    X  <- a X + (b A + c A^2) X,  A = X X^T      one quintic step per (a, b, c) triple

The polynomial maps every singular value s of X0 towards 1 without an SVD, so the result is close to
U V^T for G = U S V^T (Jordan et al. 2024, "Muon", kellerjordan.github.io/posts/muon).

File layout (one file per op): the reference, the coefficient sets, the faster algorithm shared by the
`cpu` and `triton` backends, the backend launchers, then the public op and its torch.library registration.
"""
from __future__ import annotations

import functools

import torch

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_finite_number, check_float_tensor, check_positive_int

# ---------------------------------------------------------------------------------------------
# Coefficients. Bands are the image of normalized singular values s in [0.01, 1] after 5 steps
# (float64 scalar map; tests/ops/test_newton_schulz.py::test_documented_bands checks them).
# ---------------------------------------------------------------------------------------------

#: Keller Jordan's quintic (Muon, 2024), every step. Maps s in [0.01, 1] to about [0.68, 1.13];
#: a rank-1 input comes out at 0.6964 of u v^T / (|u||v|).
MUON_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),)

#: YouJiacheng's five per-step triples (used by the NanoGPT speedrun and Dion's Triton NS).
#: Maps s in [0.01, 1] to about [0.97, 1.04].
YOU_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): per-step minimax quintics as
# deployed by the NanoGPT speedrun and Dion, which normalize by ||G||_F * 1.02. That safety factor is
# folded into the first triple here (a/1.02, b/1.02^3, c/1.02^5), so every coefficient set shares the
# same normalization and gives exactly the deployed iteration.
_PE_SAFETY = 1.02
_PE_DEPLOYED = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
#: Maps s in [0.01, 1] to about [0.86, 1.14]; converges fastest from small s.
POLAR_EXPRESS_COEFFICIENTS = (
    (_PE_DEPLOYED[0][0] / _PE_SAFETY, _PE_DEPLOYED[0][1] / _PE_SAFETY**3, _PE_DEPLOYED[0][2] / _PE_SAFETY**5),
) + _PE_DEPLOYED[1:]

COEFFICIENT_SETS = {"muon": MUON_COEFFICIENTS, "you": YOU_COEFFICIENTS, "polar_express": POLAR_EXPRESS_COEFFICIENTS}


def resolve_coefficients(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple of each of `steps` steps. A list shorter than `steps` repeats its last triple."""
    steps = check_positive_int("steps", steps)
    if isinstance(coefficients, str):
        return list(_named_coefficients(coefficients, steps)[0])
    return _resolve_triples(coefficients, steps)


@functools.lru_cache(maxsize=64)
def _named_coefficients(name: str, steps: int) -> tuple[tuple, list[float]]:
    """A named set's triples and their flat list, made once (every optimizer step asks for them)."""
    triples = tuple(_resolve_triples(name, steps))
    return triples, [float(v) for t in triples for v in t]


@functools.lru_cache(maxsize=64)
def _triples_of(flat: tuple[float, ...]) -> list[tuple[float, float, float]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _resolve_triples(coefficients, steps: int) -> list[tuple[float, float, float]]:
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(f"Invalid coefficients: {coefficients!r}; expected one of {sorted(COEFFICIENT_SETS)} or a list of (a, b, c)")
        triples = COEFFICIENT_SETS[coefficients]
    else:
        try:
            triples = [tuple(float(v) for v in t) for t in coefficients]
        except (TypeError, ValueError):
            raise ValueError(f"Invalid coefficients: {coefficients!r}; expected a name or a list of (a, b, c) triples") from None
        if not triples or any(len(t) != 3 for t in triples):
            raise ValueError(f"Invalid coefficients: {coefficients!r}; expected a non-empty list of (a, b, c) triples")
    return [tuple(triples[min(i, len(triples) - 1)]) for i in range(steps)]


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def _normalize(G: torch.Tensor, eps: float, dtype: torch.dtype, check_finite: bool) -> torch.Tensor:
    """G / (||G||_F + eps) per matrix, in `dtype`; the norm is taken in float32 (or float64). ||G||_F overflows
    float32 for finite entries above about 1e19: such a G is computed as (G / m) / (||G / m||_F + eps / m) with
    m = max|G| instead (the same value; the scaled norm lies in [1, sqrt(numel)]), with check_finite or on the
    CPU (where looking at the norm costs no device sync). Every other G takes the one-pass path, so ordinary
    inputs round as they always did; on a GPU without check_finite an overflowing G still gives NaN."""
    norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
    if (check_finite or G.device.type == "cpu") and not bool(torch.isfinite(norm).all()):
        amax = torch.linalg.vector_norm(G, ord=float("inf"), dim=(-2, -1), keepdim=True, dtype=norm_dtype)
        if bool(torch.isfinite(amax).all()):
            amax = amax.masked_fill(amax == 0, 1.0)  # an all-zero matrix stays zero
            X = G.to(norm_dtype) / amax
            return X.div_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps / amax).to(dtype)
        if check_finite:
            raise ValueError("G contains NaN or Inf; Newton-Schulz has no defined result for it")
    return (G.to(norm_dtype) / (norm + eps)).to(dtype)


def newton_schulz_reference(G: torch.Tensor, steps: int = 5, coefficients="muon", eps: float = 1e-7,
                            check_finite: bool = True) -> torch.Tensor:
    """Plain-PyTorch Newton-Schulz: the definition every backend is tested against.

    Computes in G's dtype (float64 works too), three matmuls a step, as in Keller Jordan's `muon.py`.
    """
    triples = resolve_coefficients(coefficients, steps)
    tall = G.size(-2) > G.size(-1)
    X = _normalize(G.mT if tall else G, eps, G.dtype, check_finite)
    for a, b, c in triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# ---------------------------------------------------------------------------------------------
# The faster algorithm, written once over a "symmetric product" primitive
#   sym_mm(A, B, alpha, beta, D) = alpha * A @ B^T + beta * D      whose result is known symmetric,
# so a backend computes only one triangle of blocks and mirrors it (at most 2x fewer FLOPs).
# ---------------------------------------------------------------------------------------------

def _add_identity(Z: torch.Tensor, a: float) -> torch.Tensor:
    P = Z.clone()
    P.diagonal(dim1=-2, dim2=-1).add_(a)
    return P


def ns_symmetric(X: torch.Tensor, triples, sym_mm) -> torch.Tensor:
    """Standard NS on a wide batch X (b, m, n), m <= n: A = X X^T and b A + c A A^T are symmetric."""
    for a, b, c in triples:
        A = sym_mm(X, X)
        B = sym_mm(A, A, alpha=c, beta=b, D=A)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def ns_gram(X: torch.Tensor, triples, sym_mm, restart_after: int = 2) -> torch.Tensor:
    """Gram Newton-Schulz (Zhang, Amsel, Chen, Dao 2026, Dao-AILab/gram-newton-schulz).

    The same iteration as `ns_symmetric`, run on the m x m Gram matrix R = X X^T of a wide X (m < n):
    X_k = Q X_0 with Q a polynomial in R, so each step's P = a I + b R + c R^2 is accumulated into
    Q <- Q P while R <- P R P, and X (m x n) is touched only at the start, at one restart and at the end.
    Every m x m product is symmetric (its factors are polynomials in one R), so all use sym_mm.
    The restart (X <- Q X, R <- X X^T, Q <- I after `restart_after` steps) is what keeps it stable:
    an alternative that forms R <- Q R_0 Q without touching X lost all accuracy in float16 when tried.
    Accuracy: R squares the condition number, so directions with normalized sigma below sqrt(eps)
    are resolved only to about sqrt(eps): on rank-deficient float32 input ~1e-3 relative error
    against ~3e-5 for the standard form (tests/ops/test_newton_schulz.py).
    Dense cost 8 m^2 n + 28 m^3 against 20 m^2 n + 10 m^3 for the standard form (1.5x fewer at n = 4m).
    """
    R = sym_mm(X, X)
    Q = None
    for i, (a, b, c) in enumerate(triples):
        Z = sym_mm(R, R, alpha=c, beta=b, D=R)                               # b R + c R^2
        Q = _add_identity(Z, a) if Q is None else sym_mm(Q, Z, beta=a, D=Q)  # Q (Z + a I)
        if i == len(triples) - 1:
            break
        if i + 1 == restart_after:
            X = torch.bmm(Q, X)
            R, Q = sym_mm(X, X), None
            continue
        RZ = sym_mm(R, Z, beta=a, D=R)                                       # R (Z + a I)
        R = sym_mm(Z, RZ, beta=a, D=RZ)                                      # (Z + a I) R (Z + a I)
    return torch.bmm(Q, X)


# Aspect ratio n/m from which Gram NS beats the symmetric standard form (see the FLOP counts above;
# with the blocked CPU products at m = 512 the crossover was about 1.5: benchmarks/cpu_ns_tuning.py).
GRAM_MIN_ASPECT = 1.5


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 / AMX CPUs run oneDNN's bf16 GEMMs about 2x faster than fp32 (benchmarks/cpu_ns_tuning.py;
    timings in benchmarks/RESULTS.md, "Measurements behind kernel constants")."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and torch.backends.mkldnn.is_available()


# Gram NS on a GPU only pays once the m x m products are compute-bound: below this much work it is a
# launch-bound chain of small products, slower than the eager reference (benchmarks/gpu/run.sh on an
# H100: 1x1024x4096 lost, 24x768x3072 at 1.1e10 won; timings in benchmarks/RESULTS.md,
# "Measurements behind kernel constants").
GPU_GRAM_MIN_WORK = 8e9  # batch * m^3


def choose_method(batch: int, m: int, n: int, dtype: torch.dtype, device_type: str) -> str:
    """'gram' or 'symmetric' for a (batch, m, n) stack, m <= n after transposition. Gram needs a clearly
    rectangular matrix, and more mantissa than bf16 has (it then computes in fp16 on a GPU), so:
    - CPU bf16 on a CPU with fast bf16 GEMMs stays bf16 and standard (2x faster GEMMs beat 1.5x fewer FLOPs);
    - GPU fp16 stays standard (its Gram iteration landed over 10x further from float64 on an H100);
    - GPU stacks below GPU_GRAM_MIN_WORK stay standard (launch-bound)."""
    if m == 1 or n < GRAM_MIN_ASPECT * m:
        return "symmetric"
    if device_type == "cuda" and (dtype == torch.float16 or batch * m**3 < GPU_GRAM_MIN_WORK):
        return "symmetric"
    if device_type == "cpu" and dtype == torch.bfloat16 and _cpu_has_fast_bf16():
        return "symmetric"
    return "gram"


def ns_fast(G: torch.Tensor, triples, eps: float, sym_mm, compute_dtype, check_finite: bool,
            method: str | None = None) -> torch.Tensor:
    """Shared driver of the fast backends: flatten the batch, transpose tall matrices, pick the method."""
    shape, dtype = G.shape, G.dtype
    tall = shape[-2] > shape[-1]
    X = G.reshape(-1, shape[-2], shape[-1])
    if tall:
        X = X.mT
    method = method or choose_method(*X.shape, dtype, G.device.type)
    if callable(compute_dtype):
        compute_dtype = compute_dtype(method)
    X = _normalize(X, eps, compute_dtype, check_finite)
    X = ns_gram(X, triples, sym_mm) if method == "gram" else ns_symmetric(X, triples, sym_mm)
    if tall:
        X = X.mT
    return X.to(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

def _block_product(A, B, C, alpha, beta, D, rows: slice, cols: slice) -> None:
    """C[rows, cols] = alpha * A[rows] @ B[cols]^T + beta * D[rows, cols], written in place."""
    out = C[:, rows, cols]
    if D is None:
        torch.bmm(A[:, rows], B[:, cols].mT, out=out)
        if alpha != 1.0:
            out.mul_(alpha)
    else:
        torch.baddbmm(D[:, rows, cols], A[:, rows], B[:, cols].mT, beta=beta, alpha=alpha, out=out)


def _lower_recursive(A, B, C, alpha, beta, D, r0: int, r1: int, leaf: int) -> None:
    """Lower half of C[r0:r1, r0:r1]: one GEMM for the off-diagonal quarter, recurse on the two diagonal ones."""
    if r1 - r0 <= leaf:
        _block_product(A, B, C, alpha, beta, D, slice(r0, r1), slice(r0, r1))
        return
    mid = (r0 + r1) // 2
    _block_product(A, B, C, alpha, beta, D, slice(mid, r1), slice(r0, mid))
    _lower_recursive(A, B, C, alpha, beta, D, r0, mid, leaf)
    _lower_recursive(A, B, C, alpha, beta, D, mid, r1, leaf)


def sym_mm_dense(A, B, alpha=1.0, beta=0.0, D=None):
    """alpha A B^T + beta D as one dense (batched) GEMM: the fallback where blocking does not pay."""
    if D is not None:
        return torch.baddbmm(D, A, B.mT, beta=beta, alpha=alpha)
    C = torch.bmm(A, B.mT)
    return C if alpha == 1.0 else C.mul_(alpha)


# Up to this many rows one dense GEMM is as fast as the blocked form (benchmarks/cpu_ns_tuning.py).
DENSE_MAX_ROWS = 512


def sym_mm_blocked(A, B, alpha=1.0, beta=0.0, D=None, leaf: int = 128, dense_max_rows: int = DENSE_MAX_ROWS):
    """alpha A B^T + beta D for a symmetric result, computing only a block-lower part, then mirroring.

    Recursive halving: each level is one large GEMM for the off-diagonal quarter (large GEMMs keep
    MKL efficient), down to diagonal leaves of at most `leaf` rows; 1024 rows and leaf 128 execute
    0.56 of the dense FLOPs. All products go through torch's own BLAS. Leaf 128 and DENSE_MAX_ROWS were
    chosen by benchmarks/cpu_ns_tuning.py (leaf 128 the fastest; at m <= 512 blocking gains nothing;
    timings in benchmarks/RESULTS.md, "Measurements behind kernel constants").
    """
    batch, m = A.shape[0], A.shape[1]
    if m <= dense_max_rows or A.dtype != torch.float32:  # oneDNN's bf16 GEMMs lose more to blocking than it saves
        return sym_mm_dense(A, B, alpha, beta, D)
    C = torch.empty(batch, m, m, dtype=A.dtype, device=A.device)
    _lower_recursive(A, B, C, alpha, beta, D, 0, m, leaf)
    _mirror_lower(C)
    return C


def _mirror_lower(C: torch.Tensor) -> None:
    """Copy the strict lower triangle of each matrix onto its upper one (forge._C's tiled copy when loaded)."""
    native = _native.cpu_module()
    if native is not None and C.device.type == "cpu" and C.dtype == torch.float32:
        native.symmetrize_from_lower_f32(C.data_ptr(), C.shape[0], C.shape[1], torch.get_num_threads())
        return
    upper = torch.triu(torch.ones(C.shape[-2:], dtype=torch.bool, device=C.device), diagonal=1)
    C.copy_(torch.where(upper, C.mT, C))


@_dispatch.register("newton_schulz", "torch")
def _newton_schulz_torch(G, triples, eps, check_finite):
    return newton_schulz_reference(G, len(triples), triples, eps, check_finite)


# Up to this much work (batch * m * m * n, m <= n) a float32 call runs the whole iteration in one forge._C call:
# below it the ~20 torch ops of the blocked path cost more than the arithmetic (2x2: 314 us -> 12 us;
# crossover measured by benchmarks/op_overhead.py, timings in benchmarks/RESULTS.md, "Per-call overhead").
SMALL_MAX_WORK = 1 << 17


def _ns_small(native, G: torch.Tensor, triples, eps: float, check_finite: bool) -> torch.Tensor:
    """One native call for a small float32 G (any batch shape); its norm is summed in double."""
    G = G.contiguous()
    out = torch.empty_like(G)
    flat = [v for t in triples for v in t]
    ok = native.newton_schulz_small_f32(G.data_ptr(), out.data_ptr(), G.numel() // (G.shape[-2] * G.shape[-1]),
                                        G.shape[-2], G.shape[-1], flat, eps, torch.get_num_threads())
    if check_finite and not ok:
        raise ValueError("G contains NaN or Inf; Newton-Schulz has no defined result for it")
    return out


@_dispatch.register("newton_schulz", "cpu", needs_native=False)
def _newton_schulz_cpu(G, triples, eps, check_finite):
    """float32 work, except bf16 input on CPUs with fast bf16 GEMMs, which stays bf16 (see choose_method).
    Small float32 input runs natively in one call (SMALL_MAX_WORK) where forge._C is loaded."""
    if G.dtype == torch.float32:
        rows, cols = G.shape[-2], G.shape[-1]
        native = _native.cpu_module() if G.numel() * min(rows, cols) <= SMALL_MAX_WORK else None
        if native is not None:
            return _ns_small(native, G, triples, eps, check_finite)
    keep_bf16 = G.dtype == torch.bfloat16 and _cpu_has_fast_bf16()
    return ns_fast(G, triples, eps, sym_mm_blocked, torch.bfloat16 if keep_bf16 else torch.float32, check_finite)


def sym_mm_triton_or_dense(A, B, alpha=1.0, beta=0.0, D=None):
    """sym_mm on the Triton kernel, or one dense GEMM where its tiles would leave the GPU underfilled."""
    from forge.kernels.newton_schulz import sym_mm_triton, use_dense

    if use_dense(A.shape[0], A.shape[1], A.dtype, A.device):
        return sym_mm_dense(A, B, alpha, beta, D)
    return sym_mm_triton(A, B, alpha, beta, D)


@_dispatch.register("newton_schulz", "triton")
def _newton_schulz_triton(G, triples, eps, check_finite):
    def compute_dtype(method: str) -> torch.dtype:
        if not G.is_cuda:
            return torch.float32  # Triton's CPU interpreter cannot do bf16 arithmetic
        if method == "gram" and G.dtype == torch.bfloat16:
            return torch.float16  # as Gram NS does: the Gram iteration needs more mantissa than bf16 has
        return G.dtype

    return ns_fast(G, triples, eps, sym_mm_triton_or_dense, compute_dtype, check_finite)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------

def _check_input(G, check_finite: bool) -> None:
    check_float_tensor("G", G)
    if check_finite and G.device.type == "meta":
        raise ValueError("G is a meta tensor (a shape without values), so check_finite cannot look at its "
                         "values; pass a tensor with data, or check_finite=False to trace shapes only")
    if G.dim() < 2:
        raise ValueError(f"G must have at least 2 dimensions (a matrix or a batch of matrices); got shape {tuple(G.shape)}")
    if G.numel() == 0:
        raise ValueError(f"G must not be empty; got shape {tuple(G.shape)}")


def _newton_schulz_eager(G: torch.Tensor, coefficients: list[float], eps: float, backend: str,
                         check_finite: bool) -> torch.Tensor:
    """The op's implementation; `coefficients` flat (a, b, c, a, b, c, ...), as torch.library takes them."""
    triples = _triples_of(tuple(coefficients))
    return _dispatch.resolve("newton_schulz", G.device, backend)(G, triples, eps, check_finite)


@torch.library.custom_op("forge::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], eps: float, backend: str,
                      check_finite: bool) -> torch.Tensor:
    return _newton_schulz_eager(G, coefficients, eps, backend, check_finite).contiguous()


@_newton_schulz_op.register_fake
def _(G, coefficients, eps, backend, check_finite):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="muon", eps: float = 1e-7,
                  backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Orthogonalize G (m, n) or a batch (..., m, n) with `steps` quintic Newton-Schulz steps.

    Args:
        G: float32, bfloat16 or float16; any m, n >= 1. The result has G's shape and dtype.
        steps: number of steps (5 for Muon).
        coefficients: "muon" (Keller Jordan's triple every step; s in [0.01, 1] -> [0.68, 1.13]),
            "you" (YouJiacheng's five; -> [0.97, 1.04]), "polar_express" (Amsel et al. 2025;
            -> [0.86, 1.14]), or a list of (a, b, c) triples (the last repeats if `steps` is longer).
        eps: added to the Frobenius norm, so an all-zero G gives zeros.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (see forge.ops.available_backends()).
        check_finite: raise ValueError on NaN/Inf input (costs one host sync on a GPU).
    """
    _check_input(G, check_finite)
    if isinstance(coefficients, str):
        flat = _named_coefficients(coefficients, check_positive_int("steps", steps))[1]
    else:
        flat = [float(v) for t in resolve_coefficients(coefficients, steps) for v in t]
    eps = check_finite_number("eps", eps, low=0.0)
    return _dispatch.call_op(_newton_schulz_op, _newton_schulz_eager, G, flat, eps, backend, check_finite)
