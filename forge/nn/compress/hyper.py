"""Hyper-compression (Fan et al. 2024, "Hyper-Compression: Model Compression via Hyperfunction",
arXiv 2409.00592; Juntongkuki/Hyper-Compression): a group of d weights is one point of [0, 1]^d, and it is
stored as the index n of the nearest point of an ergodic trajectory of a dynamical system,
    h(n) = frac(n a),  a = (sqrt 2, sqrt 3, sqrt 5, ...)[:d]   (an irrational winding of the d-torus, dense in it),
over n = 0 .. 2^bits - 1: one integer (the "hyperfunction" parameter theta = n) stands for d weights. Weights are
mapped into the torus by w -> w / (2 s) + 1/2 with s = max|w| per tensor. The indices then go through lossless
entropy coding (`entropy_code`: ranks by distance to the center, byte planes, the standard library's lzma),
which gains where the index distribution is uneven (Gaussian weights crowd the center).
`hyper_vq` applies it to a VQ-coded weight's codebooks (Phase 8's third stage: the weights the VPTQ stage decoded,
kept in their factored form scale * codebook[idx]; the codebooks become trajectory indices, the VQ indices go
through lzma), so the stage shrinks the previous stage's file instead of re-coding its weights at 5+ bits.
Simplified against the authors' code: no inner square with outlier classes; one scale per tensor.
"""
from __future__ import annotations

import functools
import lzma
from dataclasses import dataclass

import numpy as np
import torch

from forge.nn.compress.vptq import VQCodes

LZMA = {"format": lzma.FORMAT_RAW, "filters": [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]}
# raw LZMA2 (no xz container: its 60-byte header and checksum would be paid per tensor)
DIRECTIONS = tuple(float(np.sqrt(p)) for p in (2, 3, 5, 7, 11, 13, 17, 19))


@dataclass
class HyperCodes:
    indices: torch.Tensor      # int64 (groups,)
    scale: float               # s = max|w| (float32-representable)
    dims: int
    bits: int
    shape: tuple[int, ...]

    def decode(self) -> torch.Tensor:
        """w = (h(n) - 1/2) 2 s, float32 of `shape`."""
        points = trajectory(self.indices, self.dims)
        flat = ((points - 0.5) * (2.0 * self.scale)).float().reshape(-1)
        return flat[:int(np.prod(self.shape))].reshape(self.shape)


def trajectory(n: torch.Tensor, dims: int) -> torch.Tensor:
    """h(n) = frac(n a) in float64 (n < 2^24: n a is exact to ~1e-9, the same on every IEEE machine)."""
    a = torch.tensor(DIRECTIONS[:dims], dtype=torch.float64)
    x = n.double()[:, None] * a[None, :]
    return x - torch.floor(x)


def hyper_encode(weight: torch.Tensor, dims: int = 2, bits: int = 12, chunk: int = 4096) -> HyperCodes:
    """The index of the nearest trajectory point for each group of `dims` weights (exhaustive over 2^bits)."""
    if not 1 <= dims <= len(DIRECTIONS) or not 1 <= bits <= 24:
        raise ValueError(f"dims must be in 1..{len(DIRECTIONS)} and bits in 1..24; got dims={dims}, bits={bits}")
    flat = weight.detach().double().reshape(-1)
    scale = float(torch.tensor(flat.abs().max().item()).float().clamp_min(1e-30))
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % dims)])
    points = (flat / (2.0 * scale) + 0.5).reshape(-1, dims)
    grid = trajectory(torch.arange(1 << bits), dims)
    indices = torch.cat([torch.cdist(points[i:i + chunk], grid).argmin(dim=1) for i in range(0, len(points), chunk)])
    return HyperCodes(indices, scale, dims, bits, tuple(weight.shape))


@dataclass
class HyperVQCodes:
    """A VQ-coded weight whose codebooks are hyper-compressed: `vq` holds the decoded codebooks (what runs and
    what a gate evaluates), `codebook` / `res_codebook` their trajectory codes (what the file stores)."""
    vq: VQCodes
    codebook: HyperCodes
    res_codebook: HyperCodes | None = None

    def decode(self, backend: str = "auto") -> torch.Tensor:
        return self.vq.decode(backend)

    def linear(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.vq.linear(x, backend)


def hyper_vq(codes: VQCodes, dims: int = 2, bits: int = 12) -> HyperVQCodes:
    """`codes` with each codebook replaced by its hyper-compressed form (the same indices and scales)."""
    book = hyper_encode(codes.codebook, dims, bits)
    res = None if codes.res_codebook is None else hyper_encode(codes.res_codebook, dims, bits)
    vq = VQCodes(codes.idx, book.decode(), codes.scale, codes.out_features, codes.res_idx,
                 None if res is None else res.decode())
    return HyperVQCodes(vq, book, res)


def index_code(idx: torch.Tensor, k: int) -> bytes:
    """Lossless coding of VQ indices (< k): one byte each (two, little-endian, when k > 256), through lzma."""
    dtype = np.uint8 if k <= 256 else np.dtype("<u2")
    return lzma.compress(idx.numpy().astype(dtype).tobytes(), **LZMA)


def index_decode(data: bytes, k: int, shape) -> torch.Tensor:
    dtype = np.uint8 if k <= 256 else np.dtype("<u2")
    values = np.frombuffer(lzma.decompress(data, **LZMA), dtype=dtype).astype(np.int32)
    return torch.from_numpy(values.reshape(shape).copy())


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers (< 2^width) as a little-endian bit stream, width bits each, zero-padded to a byte."""
    v = np.asarray(values, dtype=np.uint64)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)[None, :]) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * width]
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) * weights[None, :]).sum(axis=1)


@functools.lru_cache(maxsize=8)
def _center_ranks(dims: int, bits: int) -> torch.Tensor:
    """rank[n]: position of trajectory point n when the points are sorted by distance to the torus center
    (stable, so ties keep index order); a bijection the decoder rebuilds from (dims, bits)."""
    d = ((trajectory(torch.arange(1 << bits), dims) - 0.5) ** 2).sum(dim=1)
    order = torch.argsort(d, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def entropy_code(indices: torch.Tensor, bits: int, dims: int) -> bytes:
    """Lossless coding of the indices: each index becomes its point's rank by distance to the center (Gaussian
    weights make small ranks common), the ranks are split into byte planes (most significant first), and the
    planes go through lzma (xz, preset 9 | extreme)."""
    ranks = _center_ranks(dims, bits)[indices].numpy().astype(np.uint32)
    planes = [((ranks >> (8 * b)) & 0xFF).astype(np.uint8) for b in reversed(range(-(-bits // 8)))]
    return lzma.compress(np.concatenate(planes).tobytes(), **LZMA)


def entropy_decode(data: bytes, bits: int, dims: int, count: int) -> torch.Tensor:
    planes = np.frombuffer(lzma.decompress(data, **LZMA), dtype=np.uint8).reshape(-1, count).astype(np.uint32)
    ranks = np.zeros(count, dtype=np.uint32)
    for plane in planes:
        ranks = (ranks << 8) | plane
    order = torch.argsort(_center_ranks(dims, bits))          # rank -> index
    return order[torch.from_numpy(ranks.astype(np.int64))]
