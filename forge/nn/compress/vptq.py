"""The VPTQ encoder (Liu et al. 2024, arXiv 2409.17066; microsoft/VPTQ, algorithm branch), scaled to tiny layers.

Weights are normalized per input column (scale_j = RMS of column j), cut into vectors of v consecutive output
rows of one column (the layout of forge.ops.vq), and quantized with:
1. a codebook from k-means weighted by the diagonal of the layer's Hessian H = 2 X^T X / n (calibration inputs
   X), each vector weighted by H_jj of its column (after normalization: H_jj scale_j^2);
2. GPTQ-style error feedback (Frantar et al. 2022): columns in descending-diag(H) order; a column's
   quantization error e_j = (w_j - q_j) / [H^-1]_jj, with [H^-1] the upper Cholesky factor of H^-1, is
   pushed into the later columns: W[:, later] -= e_j [H^-1]_{j, later};
3. a residual codebook: k-means on what the first codebook leaves, used on the residual of every vector.
Codebooks and scales are rounded to float16 before the GPTQ loop (the file format stores float16), so the
stored codes decode to exactly the weights the loop produced.
Bits per weight: (log2 k + log2 k_res) / v for the indices, plus the codebooks and scales, which the file
format counts (a 65536-entry codebook is bigger than a tiny layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.ops import vq_decode, vq_linear


@dataclass
class VQCodes:
    """A VQ-coded weight (out_features, in_features): see forge.ops.vq for the layout."""

    idx: torch.Tensor
    codebook: torch.Tensor
    scale: torch.Tensor
    out_features: int
    res_idx: torch.Tensor | None = None
    res_codebook: torch.Tensor | None = None

    def decode(self, backend: str = "auto") -> torch.Tensor:
        return vq_decode(self.idx, self.codebook, self.scale, self.out_features, self.res_idx, self.res_codebook,
                         backend=backend)

    def linear(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return vq_linear(x, self.idx, self.codebook, self.scale, self.out_features, self.res_idx,
                         self.res_codebook, backend=backend)


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n (float64) from calibration inputs x (..., in_features): the Hessian of the layer's
    squared output error in its weights (GPTQ, OBQ)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * x2.T @ x2 / x2.shape[0]


def nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of each vector (squared Euclidean distance), int64 (N,)."""
    d = (vectors * vectors).sum(1, keepdim=True) - 2 * vectors @ codebook.T + (codebook * codebook).sum(1)[None]
    return d.argmin(dim=1)


def weighted_kmeans(vectors: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 25,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means minimizing sum_i weights_i ||x_i - c(x_i)||^2: (k, v) float32 codebook.
    Init: k-means++ (Arthur & Vassilvitskii 2007) with the weights; an empty cluster is re-seeded with the vector
    of largest weighted error."""
    x, w = vectors.double(), weights.double().clamp_min(0) + 1e-12
    k_eff = min(k, torch.unique(x, dim=0).shape[0])
    centers = _kmeans_plus_plus(x, w, k_eff, generator)
    for _ in range(iters):
        assign = nearest(x, centers)
        mass = torch.zeros(k_eff, dtype=torch.float64).index_add_(0, assign, w)
        sums = torch.zeros_like(centers).index_add_(0, assign, x * w[:, None])
        empty = mass == 0
        centers = torch.where(empty[:, None], centers, sums / mass.clamp_min(1e-300)[:, None])
        if empty.any():
            err = w * ((x - centers[assign]) ** 2).sum(1)
            centers[empty] = x[err.topk(int(empty.sum())).indices]
    if k_eff < k:  # fewer distinct vectors than codewords: pad with copies (never chosen over the originals)
        centers = torch.cat([centers, centers[:1].expand(k - k_eff, -1)])
    return centers.float()


def _kmeans_plus_plus(x, w, k, generator):
    """k-means++ seeding: each next center drawn with probability w_i D(x_i)^2 (D: distance to the nearest
    center so far); the first with probability w_i."""
    on = x.device if generator is None else generator.device   # drawn where the seeded generator lives
    centers = [x[int(torch.multinomial(w.to(on), 1, generator=generator)[0])]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = w * d2
        i = int(torch.multinomial(p.to(on), 1, generator=generator)[0]) if p.sum() > 0 else int(torch.argmax(w))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centers)


def _column_vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    """(rows padded to a multiple of v, in) -> (groups * in, v): vector (g, j) at row g * in + j."""
    groups = w.shape[0] // v
    return w.reshape(groups, v, w.shape[1]).permute(0, 2, 1).reshape(-1, v)


def _normalize(weight: torch.Tensor, v: int):
    """(scale (in,), padded normalized weight (G v, in))."""
    w = weight.detach().double()
    scale = w.pow(2).mean(dim=0).sqrt().clamp_min(1e-4).half().double()  # float16: what the file stores
    pad = (-w.shape[0]) % v
    return scale, torch.cat([w / scale, w.new_zeros(pad, w.shape[1])])


def _train_codebooks(wn, col_weight, v, k, k_res, iters, generator):
    vectors = _column_vectors(wn, v)
    weights = col_weight.repeat(wn.shape[0] // v)
    codebook = weighted_kmeans(vectors, weights, k, iters, generator).half().double()  # float16, as stored
    if not k_res:
        return codebook, None
    residual = vectors - codebook[nearest(vectors, codebook)]
    return codebook, weighted_kmeans(residual, weights, k_res, iters, generator).half().double()


def _quantize_column(col, v, codebook, res_codebook):
    """(quantized column, idx, res_idx) for one column (G v,) of the normalized weight."""
    vecs = col.reshape(-1, v)
    idx = nearest(vecs, codebook)
    q = codebook[idx]
    res_idx = None
    if res_codebook is not None:
        res_idx = nearest(vecs - q, res_codebook)
        q = q + res_codebook[res_idx]
    return q.reshape(-1), idx, res_idx


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1 (GPTQ's Hinv)."""
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _gptq_columns(wp, hinv, quantize, block: int):
    """GPTQ's lazy-batch loop over the columns of wp (already in processing order), in place: each column is
    quantized, and its error e = (w - q) / hinv[j, j] is pushed into the later columns by -e hinv[j, later]."""
    n = wp.shape[1]
    codes = []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        errs = torch.zeros(wp.shape[0], i2 - i1, dtype=wp.dtype)
        for i in range(i1, i2):
            q, *code = quantize(wp[:, i])
            codes.append(code)
            err = (wp[:, i] - q) / hinv[i, i]
            wp[:, i:i2] -= err[:, None] * hinv[i, i:i2][None, :]
            errs[:, i - i1] = err
        wp[:, i2:] -= errs @ hinv[i1:i2, i2:]
    return codes


def vptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, v: int = 8, k: int = 256, k_res: int = 0,
                  iters: int = 25, block: int = 128, damp: float = 0.01, error_feedback: bool = True,
                  seed: int = 0) -> VQCodes:
    """VQ codes for weight (out, in) from its Hessian (in, in) (`hessian_from_inputs`); module docstring.
    error_feedback=False quantizes every column alone (nearest codewords), for comparison."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight must be 2-dim (out, in) and hessian (in, in); got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}")
    generator = torch.Generator().manual_seed(seed)
    scale, wn = _normalize(weight, v)
    h = hessian.double() * scale[:, None] * scale[None, :]        # the Hessian of the normalized weight
    codebook, res_codebook = _train_codebooks(wn, h.diagonal(), v, k, k_res, iters, generator)
    order = torch.argsort(h.diagonal(), descending=True)
    hinv = _inverse_hessian_factor(h[order][:, order], damp) if error_feedback else torch.eye(len(order)).double()
    codes = _gptq_columns(wn[:, order].clone(), hinv, lambda c: _quantize_column(c, v, codebook, res_codebook),
                          block)
    inverse = torch.argsort(order)
    idx = torch.stack([c[0] for c in codes], dim=1)[:, inverse].to(torch.int32)
    res_idx = torch.stack([c[1] for c in codes], dim=1)[:, inverse].to(torch.int32) if k_res else None
    return VQCodes(idx.contiguous(), codebook.float(), scale.float(), weight.shape[0],
                   None if res_idx is None else res_idx.contiguous(),
                   None if res_codebook is None else res_codebook.float())
