"""SeedLM (Shafipour et al. 2024, "SeedLM: Compressing LLM Weights into Seeds of Pseudo-Random Generators",
arXiv 2410.10714): a block w of C weights is stored as a K-bit LFSR seed s and P quantized coefficients.

LFSR (the paper's Algorithm 1, taps from its Table 6 as the public replication qiuyu-ren/seedlm-repro lists
them): bk = XOR of the state bits at the taps; state <- (state >> 1) | (bk << (K - 1)).
Basis: V(s) = the C * P states that follow s, row-major as C x P; U(s) = (V(s) - 2^(K-1)) / (2^(K-1) - 1).
Coefficients: t = U(s)^+ w (pseudo-inverse in float64, then float32), quantized to P 4-bit mantissas with one
shared 4-bit exponent:  e = clamp(ceil(log2(max|t| / 7.5)), -8, 7),  q = clamp(round(t / 2^e), -8, 7)
(the replication's "range" rule: the paper's printed floor(log2 max|t|) reaches only 5 of the 16 codes).
Search: the seed with the lowest squared error ||w - U(s) q 2^e||^2 after quantization; the candidates are the
first `num_seeds` states of the walk 1, step(1), step(step(1)), ... (all 2^K - 1 by default); a tie keeps
the earlier seed. Storage: (K + 4 + 4P) / C bits per weight; (C, P, K) = (8, 3, 16) is 4 bits.

Ops: `seedlm_search` (blocks -> seeds, mantissas, exponents, errors), `seedlm_decode` (-> blocks) and
`seedlm_linear` (y = x W^T, W rebuilt from its blocks a tile at a time, never whole, on the fast backends).
The `cpu` search is fused: bases generated from the LFSR on the fly, projection, quantization and error in
one pass, no (blocks x seeds) tensor; threads split the walk. The `triton` and `cuda` searches read U^T and
U^+ from a (seeds, P, C) table built once per (K, C, P) (seeds-sized, never blocks x seeds). Seeds whose U is
rank-deficient are skipped by the `cpu` kernel (the others use torch.linalg.pinv's least-norm solution). Weights of a (rows, cols) matrix are flattened row-major, zero-padded to
a multiple of C, and cut into blocks.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from forge import _native
from forge.ops import _dispatch
from forge.ops._validate import check_positive_int

# Table 6 of the paper (as transcribed by the replication): bit positions whose XOR is the feedback bit.
LFSR_TAPS: dict[int, tuple[int, ...]] = {
    2: (0, 1), 3: (0, 1), 4: (0, 1), 5: (0, 2), 6: (0, 1), 7: (0, 1), 8: (0, 2, 3, 4), 9: (0, 4), 10: (0, 3),
    11: (0, 2), 12: (0, 1, 2, 8), 13: (0, 1, 2, 5), 14: (0, 1, 2, 12), 15: (0, 1), 16: (0, 1, 3, 12),
    17: (0, 3), 18: (0, 7), 19: (0, 1, 2, 5), 20: (0, 3), 21: (0, 2), 22: (0, 1), 23: (0, 5), 24: (0, 1, 2, 7),
}
MANTISSA_MIN, MANTISSA_MAX = -8, 7
EXPONENT_MIN, EXPONENT_MAX = -8, 7
MAX_C, MAX_P = 32, 8


# ---------------------------------------------------------------------------------------------
# The LFSR and the bases
# ---------------------------------------------------------------------------------------------

def taps_mask(K: int) -> int:
    return sum(1 << tap for tap in LFSR_TAPS[K])


def lfsr_sequence(K: int, seed: int, length: int) -> list[int]:
    """The `length` states after `seed` (Algorithm 1; the first entry is the state after one update)."""
    state, mask, out = seed, taps_mask(K), []
    for _ in range(length):
        bk = (state & mask).bit_count() & 1
        state = (state >> 1) | (bk << (K - 1))
        out.append(state)
    return out


@functools.lru_cache(maxsize=8)
def lfsr_walk(K: int) -> np.ndarray:
    """All 2^K - 1 states in walk order from state 1: walk[0] = 1, walk[i + 1] = step(walk[i])."""
    n = (1 << K) - 1
    walk = np.empty(n, dtype=np.int64)
    walk[0] = 1
    walk[1:] = lfsr_sequence(K, 1, n - 1)
    return walk


def normalize_states(states: np.ndarray, K: int) -> np.ndarray:
    """U = (V - 2^(K-1)) / (2^(K-1) - 1) in float64, then float32: states 1 .. 2^K - 1 map into [-1, 1]."""
    half = float(1 << (K - 1))
    return ((states.astype(np.float64) - half) / (half - 1.0)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def walk_tables(K: int, C: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(walk: float32 normalized walk, wrapped to cover every window; position: int32 state -> walk index).
    The basis of seed s is walk[position[s] + 1 : position[s] + 1 + C * P] as C x P."""
    walk = lfsr_walk(K)
    idx = np.arange(len(walk) + C * P + 1) % len(walk)
    position = np.zeros(1 << K, dtype=np.int32)
    position[walk] = np.arange(len(walk), dtype=np.int32)
    return torch.from_numpy(normalize_states(walk[idx], K)), torch.from_numpy(position)


def candidate_seeds(K: int, num_seeds: int | None = None) -> torch.Tensor:
    """The seeds a search tries: the first `num_seeds` states of the walk from state 1 (all by default)."""
    walk = lfsr_walk(K)
    return torch.from_numpy(walk[: len(walk) if num_seeds is None else num_seeds].astype(np.int32))


def seedlm_bases(seeds: torch.Tensor, K: int, C: int, P: int) -> torch.Tensor:
    """U(s) for each seed: float32 (n, C, P)."""
    walk, position = walk_tables(K, C, P)
    start = position[seeds.long().cpu()].long() + 1
    return walk[start[:, None] + torch.arange(C * P)].reshape(-1, C, P).to(seeds.device)


@functools.lru_cache(maxsize=4)
def _search_tables(K: int, C: int, P: int, num_seeds: int):
    """(U^T: (S, P, C), (U^+)^T: (S, C, P)) float32 for the candidate seeds; U^+ from float64 SVD."""
    U = seedlm_bases(candidate_seeds(K, num_seeds), K, C, P)
    pinv = torch.linalg.pinv(U.double()).float()
    return U.transpose(1, 2).contiguous(), pinv.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# References (plain PyTorch; they define the ops)
# ---------------------------------------------------------------------------------------------

def quantize_coefficients_reference(t: torch.Tensor):
    """(q int8, e int8, t_hat = q 2^e float32) over the last dim of float32 t: one shared exponent
    e = clamp(ceil(log2(max|t| / 7.5)), -8, 7) (exact through frexp: x = m 2^E, m in [0.5, 1) gives
    ceil(log2 x) = E - (m == 0.5)), q = clamp(round(t 2^-e), -8, 7), round half to even."""
    amax = t.abs().amax(dim=-1)
    m, E = torch.frexp(amax / 7.5)
    e = (E - (m == 0.5).to(E.dtype)).clamp(EXPONENT_MIN, EXPONENT_MAX)
    e = torch.where(amax == 0, torch.full_like(e, EXPONENT_MIN), e)
    q = torch.round(torch.ldexp(t, -e[..., None].float())).clamp(MANTISSA_MIN, MANTISSA_MAX)
    return q.to(torch.int8), e.to(torch.int8), torch.ldexp(q, e[..., None].float())


def _search_chunk(w, UT, UpT):
    """errors (S, B) float32 and the quantized (q, e) for one chunk of seeds against blocks w (B, C)."""
    t = torch.matmul(w, UpT)                                   # (S, B, P) = (U^+ w) for every pair
    q, e, t_hat = quantize_coefficients_reference(t)
    residual = torch.matmul(t_hat, UT) - w                     # (S, B, C)
    return (residual * residual).sum(dim=-1), q, e


def seedlm_search_reference(blocks: torch.Tensor, K: int, P: int, num_seeds: int | None = None,
                            seed_chunk: int = 2048, block_chunk: int = 512):
    """(seeds int32 (n,), q int8 (n, P), e int8 (n,), err float32 (n,)) for float32 blocks (n, C): the
    Algorithm-3 search with precomputed pseudo-inverses and batched matmuls, chunked over seeds and blocks."""
    n, C = blocks.shape
    num_seeds = (1 << K) - 1 if num_seeds is None else num_seeds
    UT, UpT = _search_tables(K, C, P, num_seeds)
    cands = candidate_seeds(K, num_seeds)
    seeds, q = torch.zeros(n, dtype=torch.int32), torch.zeros(n, P, dtype=torch.int8)
    e, err = torch.full((n,), EXPONENT_MIN, dtype=torch.int8), torch.full((n,), float("inf"))
    for b0 in range(0, n, block_chunk):
        w = blocks[b0:b0 + block_chunk].float().cpu()
        rows = torch.arange(w.shape[0])
        for s0 in range(0, num_seeds, seed_chunk):
            errs, qs, es = _search_chunk(w, UT[s0:s0 + seed_chunk], UpT[s0:s0 + seed_chunk])
            best, j = errs.min(dim=0)                          # first minimum: ties keep the earlier seed
            take = best < err[b0:b0 + len(w)]
            sel = rows[take]
            err[b0 + sel], seeds[b0 + sel] = best[take], cands[s0 + j[take]]
            q[b0 + sel], e[b0 + sel] = qs[j[take], sel], es[j[take], sel]
    return tuple(t.to(blocks.device) for t in (seeds, q, e, err))


def seedlm_decode_reference(seeds, q, e, K: int, C: int) -> torch.Tensor:
    """Blocks U(s) . (q 2^e): float32 (n, C)."""
    t_hat = torch.ldexp(q.float(), e.float()[:, None])
    return torch.einsum("ncp,np->nc", seedlm_bases(seeds, K, C, q.shape[1]), t_hat)


def blocks_to_weight(blocks: torch.Tensor, shape) -> torch.Tensor:
    """The weight of `shape` from its row-major blocks (the padding past the last weight dropped)."""
    numel = int(np.prod(shape))
    return blocks.reshape(-1)[:numel].reshape(shape)


def weight_to_blocks(w: torch.Tensor, C: int) -> torch.Tensor:
    """Row-major flattening, zero-padded to a multiple of C: float32 (ceil(numel / C), C)."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % C
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, C)


def seedlm_linear_reference(x, seeds, q, e, out_features: int, K: int, C: int) -> torch.Tensor:
    """y = x W^T with W (out_features, x.shape[-1]) decoded whole from its blocks."""
    w = blocks_to_weight(seedlm_decode_reference(seeds, q, e, K, C), (out_features, x.shape[-1]))
    return (x.float() @ w.T).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Backend launchers. search (blocks (n, C) float32 contiguous, K, P, num_seeds) -> (seeds, q, e, err);
# decode (seeds, q, e, K, C) -> (n, C); linear (x2d float32, seeds, q, e, out_features, K, C) -> y2d.
# ---------------------------------------------------------------------------------------------

def _new_output(shape, dtype, device) -> torch.Tensor:
    """Output buffers of the native launchers (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


@_dispatch.register("seedlm_search", "torch")
def _search_torch(blocks, K, P, num_seeds):
    return seedlm_search_reference(blocks, K, P, num_seeds)


@_dispatch.register("seedlm_decode", "torch")
def _decode_torch(seeds, q, e, K, C):
    return seedlm_decode_reference(seeds, q, e, K, C)


@_dispatch.register("seedlm_linear", "torch")
def _linear_torch(x, seeds, q, e, out_features, K, C):
    return seedlm_linear_reference(x, seeds, q, e, out_features, K, C)


@_dispatch.register("seedlm_search", "cpu")
def _search_cpu(blocks, K, P, num_seeds):
    blocks = blocks.float().contiguous()
    n, C = blocks.shape
    seeds, q = _new_output(n, torch.int32, blocks.device), _new_output((n, P), torch.int8, blocks.device)
    e, err = _new_output(n, torch.int8, blocks.device), _new_output(n, torch.float32, blocks.device)
    _native.cpu_module().seedlm_search(blocks.data_ptr(), n, C, P, K, taps_mask(K), num_seeds, seeds.data_ptr(),
                                       q.data_ptr(), e.data_ptr(), err.data_ptr(), torch.get_num_threads())
    return seeds, q, e, err


def _code_pointers(seeds, q, e):
    return seeds.contiguous(), q.contiguous(), e.contiguous()


@_dispatch.register("seedlm_decode", "cpu")
def _decode_cpu(seeds, q, e, K, C):
    seeds, q, e = _code_pointers(seeds, q, e)
    walk, position = walk_tables(K, C, q.shape[1])
    out = _new_output((seeds.shape[0], C), torch.float32, seeds.device)
    _native.cpu_module().seedlm_decode(seeds.data_ptr(), q.data_ptr(), e.data_ptr(), seeds.shape[0], C, q.shape[1],
                                       walk.data_ptr(), position.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


@_dispatch.register("seedlm_linear", "cpu")
def _linear_cpu(x, seeds, q, e, out_features, K, C):
    seeds, q, e = _code_pointers(seeds, q, e)
    xf = x.float().contiguous()
    walk, position = walk_tables(K, C, q.shape[1])
    y = _new_output((xf.shape[0], out_features), torch.float32, x.device)
    _native.cpu_module().seedlm_linear(xf.data_ptr(), xf.shape[0], xf.shape[1], out_features, seeds.data_ptr(),
                                       q.data_ptr(), e.data_ptr(), C, q.shape[1], walk.data_ptr(),
                                       position.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


@_dispatch.register("seedlm_search", "triton")
def _search_triton(blocks, K, P, num_seeds):
    from forge.kernels.seedlm import seedlm_search_triton

    C = blocks.shape[1]
    UT, UpT = (t.to(blocks.device) for t in _search_tables(K, C, P, num_seeds))
    best, q, e, err = seedlm_search_triton(blocks.float().contiguous(), UT, UpT.transpose(1, 2).contiguous(),
                                           num_seeds)
    return candidate_seeds(K, num_seeds).to(blocks.device)[best.long()], q, e, err


def _device_tables(K, C, P, device):
    return tuple(t.to(device) for t in walk_tables(K, C, P))


@_dispatch.register("seedlm_decode", "triton")
def _decode_triton(seeds, q, e, K, C):
    from forge.kernels.seedlm import seedlm_decode_triton

    seeds, q, e = _code_pointers(seeds, q, e)
    return seedlm_decode_triton(*_device_tables(K, C, q.shape[1], seeds.device), seeds, q, e, C)


@_dispatch.register("seedlm_linear", "triton")
def _linear_triton(x, seeds, q, e, out_features, K, C):
    from forge.kernels.seedlm import seedlm_linear_triton

    seeds, q, e = _code_pointers(seeds, q, e)
    walk, position = _device_tables(K, C, q.shape[1], x.device)
    return seedlm_linear_triton(x.contiguous(), walk, position, seeds, q, e, out_features, C).to(x.dtype)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@_dispatch.register("seedlm_search", "cuda")
def _search_cuda(blocks, K, P, num_seeds):
    blocks = blocks.float().contiguous()
    n, C = blocks.shape
    UT, UpT = (t.to(blocks.device) for t in _search_tables(K, C, P, num_seeds))
    pinv = UpT.transpose(1, 2).contiguous()
    best, q = torch.empty(n, dtype=torch.int32, device=blocks.device), _new_output((n, P), torch.int8, blocks.device)
    e, err = _new_output(n, torch.int8, blocks.device), _new_output(n, torch.float32, blocks.device)
    _native.cuda_module().seedlm_search(blocks.data_ptr(), n, C, P, UT.data_ptr(), pinv.data_ptr(), num_seeds,
                                        best.data_ptr(), q.data_ptr(), e.data_ptr(), err.data_ptr(),
                                        _stream(blocks.device))
    return candidate_seeds(K, num_seeds).to(blocks.device)[best.long()], q, e, err


@_dispatch.register("seedlm_decode", "cuda")
def _decode_cuda(seeds, q, e, K, C):
    seeds, q, e = _code_pointers(seeds, q, e)
    walk, position = _device_tables(K, C, q.shape[1], seeds.device)
    out = _new_output((seeds.shape[0], C), torch.float32, seeds.device)
    _native.cuda_module().seedlm_decode(walk.data_ptr(), position.data_ptr(), seeds.data_ptr(), q.data_ptr(),
                                        e.data_ptr(), seeds.shape[0], C, q.shape[1], out.data_ptr(),
                                        _stream(seeds.device))
    return out


@_dispatch.register("seedlm_linear", "cuda")
def _linear_cuda(x, seeds, q, e, out_features, K, C):
    seeds, q, e = _code_pointers(seeds, q, e)
    xf = x.float().contiguous()
    walk, position = _device_tables(K, C, q.shape[1], x.device)
    y = _new_output((xf.shape[0], out_features), torch.float32, x.device)
    _native.cuda_module().seedlm_linear(xf.data_ptr(), xf.shape[0], xf.shape[1], out_features, walk.data_ptr(),
                                        position.data_ptr(), seeds.data_ptr(), q.data_ptr(), e.data_ptr(), C,
                                        q.shape[1], y.data_ptr(), _stream(x.device))
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _check_K(K) -> int:
    if not isinstance(K, int) or isinstance(K, bool) or K not in LFSR_TAPS:
        raise ValueError(f"K must be an int in {min(LFSR_TAPS)}..{max(LFSR_TAPS)} (the paper's LFSR table); got {K!r}")
    return K


def _check_search(blocks, K, P, num_seeds) -> int:
    _check_K(K)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.float32 or blocks.dim() != 2:
        got = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise TypeError(f"blocks must be a 2-dim float32 tensor (n_blocks, C); got {got}")
    n, C = blocks.shape
    if n == 0 or not 1 <= C <= MAX_C:
        raise ValueError(f"blocks must have at least one row and 1 <= C <= {MAX_C} columns; got shape {(n, C)}")
    check_positive_int("P", P)
    if P > min(C, MAX_P):
        raise ValueError(f"P must be at most min(C, {MAX_P}) = {min(C, MAX_P)}; got P={P}")
    limit = (1 << K) - 1
    num_seeds = limit if num_seeds is None else num_seeds
    if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or not 1 <= num_seeds <= limit:
        raise ValueError(f"num_seeds must be an int in 1..2^K - 1 = {limit} (or None for all); got {num_seeds!r}")
    if blocks.device.type != "meta" and not bool(torch.isfinite(blocks).all()):
        raise ValueError("blocks hold NaN or Inf; SeedLM encodes finite weights only")
    return num_seeds


def _check_codes(seeds, q, e, K, C) -> None:
    _check_K(K)
    check_positive_int("C", C)
    for name, t, dtype, dim in (("seeds", seeds, torch.int32, 1), ("q", q, torch.int8, 2), ("e", e, torch.int8, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != dim:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a {dim}-dim {str(dtype).replace('torch.', '')} tensor; got {got}")
    if not (seeds.shape[0] == q.shape[0] == e.shape[0]) or seeds.shape[0] == 0:
        raise ValueError(f"seeds, q and e must describe the same nonzero number of blocks; got "
                         f"{seeds.shape[0]}, {q.shape[0]}, {e.shape[0]}")
    if not 1 <= C <= MAX_C or not 1 <= q.shape[1] <= min(C, MAX_P):
        raise ValueError(f"need 1 <= C <= {MAX_C} and 1 <= P <= min(C, {MAX_P}); got C={C}, P={q.shape[1]}")
    if seeds.device.type == "meta":
        return
    bad = [((seeds < 1) | (seeds >= 1 << K)).any(), ((q < MANTISSA_MIN) | (q > MANTISSA_MAX)).any(),
           ((e < EXPONENT_MIN) | (e > EXPONENT_MAX)).any()]
    for name, flag, allowed in zip(("seeds", "q", "e"), torch.stack(bad).tolist(),
                                   (f"1..{(1 << K) - 1}", "-8..7", "-8..7")):
        if flag:
            raise ValueError(f"{name} holds values outside {allowed}")


def _check_linear(x, seeds, q, e, out_features, K, C) -> None:
    _check_codes(seeds, q, e, K, C)
    check_positive_int("out_features", out_features)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1:
        raise TypeError(f"x must be a float tensor (..., in_features); got {getattr(x, 'dtype', type(x).__name__)}")
    need = -(-out_features * x.shape[-1] // C)
    if seeds.shape[0] != need:
        raise ValueError(f"a ({out_features}, {x.shape[-1]}) weight in blocks of C={C} has {need} blocks; "
                         f"seeds has {seeds.shape[0]}")
    for name, t in (("seeds", seeds), ("q", q), ("e", e)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# ---------------------------------------------------------------------------------------------
# torch.library ops (what torch.compile sees); eager calls skip the wrapper and run the same code
# ---------------------------------------------------------------------------------------------

def _run_search(blocks, K, P, num_seeds, backend):
    return tuple(_dispatch.resolve("seedlm_search", blocks.device, backend)(blocks, K, P, num_seeds))


def _run_decode(seeds, q, e, K, C, backend):
    return _dispatch.resolve("seedlm_decode", seeds.device, backend)(seeds, q, e, K, C)


def _run_linear(x, seeds, q, e, out_features, K, C, backend):
    x2 = x.reshape(-1, x.shape[-1])
    y = _dispatch.resolve("seedlm_linear", x.device, backend)(x2, seeds, q, e, out_features, K, C)
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("forge::seedlm_search", mutates_args=())
def _search_op(blocks: torch.Tensor, K: int, P: int, num_seeds: int, backend: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.clone() for t in _run_search(blocks, K, P, num_seeds, backend))


@_search_op.register_fake
def _(blocks, K, P, num_seeds, backend):
    n = blocks.shape[0]
    return (blocks.new_empty(n, dtype=torch.int32), blocks.new_empty((n, P), dtype=torch.int8),
            blocks.new_empty(n, dtype=torch.int8), blocks.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("forge::seedlm_decode", mutates_args=())
def _decode_op(seeds: torch.Tensor, q: torch.Tensor, e: torch.Tensor, K: int, C: int, backend: str) -> torch.Tensor:
    return _run_decode(seeds, q, e, K, C, backend).clone()


@_decode_op.register_fake
def _(seeds, q, e, K, C, backend):
    return seeds.new_empty((seeds.shape[0], C), dtype=torch.float32)


@torch.library.custom_op("forge::seedlm_linear", mutates_args=())
def _linear_op(x: torch.Tensor, seeds: torch.Tensor, q: torch.Tensor, e: torch.Tensor, out_features: int, K: int,
               C: int, backend: str) -> torch.Tensor:
    return _run_linear(x, seeds, q, e, out_features, K, C, backend).clone()


@_linear_op.register_fake
def _(x, seeds, q, e, out_features, K, C, backend):
    return x.new_empty(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def seedlm_search(blocks: torch.Tensor, K: int = 16, P: int = 3, num_seeds: int | None = None,
                  backend: str = "auto"):
    """The SeedLM search (module docstring) for float32 blocks (n, C):
    (seeds int32 (n,), q int8 (n, P) in [-8, 7], e int8 (n,) in [-8, 7], err float32 (n,) = ||w - U q 2^e||^2).
    num_seeds: how many seeds of the walk from state 1 to try (None: all 2^K - 1, the paper's search)."""
    num_seeds = _check_search(blocks, K, P, num_seeds)
    return _dispatch.call_op(_search_op, _run_search, blocks, K, P, num_seeds, backend)


def seedlm_decode(seeds: torch.Tensor, q: torch.Tensor, e: torch.Tensor, K: int = 16, C: int = 8,
                  backend: str = "auto") -> torch.Tensor:
    """Blocks U(s) . (q 2^e): float32 (n, C) from the outputs of `seedlm_search`."""
    _check_codes(seeds, q, e, K, C)
    return _dispatch.call_op(_decode_op, _run_decode, seeds, q, e, K, C, backend)


def seedlm_linear(x: torch.Tensor, seeds: torch.Tensor, q: torch.Tensor, e: torch.Tensor, out_features: int,
                  K: int = 16, C: int = 8, backend: str = "auto") -> torch.Tensor:
    """y = x W^T (..., out_features), W (out_features, x.shape[-1]) the row-major weight of the SeedLM blocks
    (ceil(out_features * in_features / C) of them). The `cpu` backend rebuilds 16 rows of W at a time and
    never holds W whole; inference only (no gradient); y has x's dtype, accumulated in float32."""
    _check_linear(x, seeds, q, e, out_features, K, C)
    return _dispatch.call_op(_linear_op, _run_linear, x, seeds, q, e, out_features, K, C, backend)
