#pragma once
#include <cstdint>

namespace forge {

// SeedLM (Shafipour et al. 2024, arXiv 2410.10714) kernels on raw pointers; the Python wrapper in
// forge/ops/seedlm.py checks dtype, shape, contiguity and the ranges of C, P, K.
//
// A block w (C float32 weights) is stored as a K-bit LFSR seed s and P coefficients t_hat = q * 2^e
// (q int8 in [-8, 7], one shared e in [-8, 7]); the block decodes to U(s) . t_hat, U(s) the C x P matrix
// (row-major) of the C*P LFSR states that follow s, normalized as (V - 2^(K-1)) / (2^(K-1) - 1).
// LFSR (the paper's Algorithm 1): bk = XOR of the state bits in taps_mask; state = (state >> 1) | bk << (K-1).

// Exhaustive (or first-num_seeds) search: the candidate seeds are the first num_seeds states of the walk
// 1, step(1), step(step(1)), ... For each block, the seed whose quantized coefficients give the lowest
// squared error ||w - U(s) t_hat||^2; ties keep the earlier seed of the walk. The bases are generated on the
// fly from the LFSR (no blocks x seeds tensor); t = U(s)^+ w with U^+ from a float64 QR; seeds whose U is
// rank-deficient are skipped. Writes seeds (int32), q (int8, n x P), e (int8) and the error (float32).
void seedlm_search_cpu(uintptr_t blocks, int64_t n, int C, int P, int K, uint32_t taps_mask, int64_t num_seeds,
                       uintptr_t seeds, uintptr_t q, uintptr_t e, uintptr_t err, int num_threads);

// Decode n blocks to (n, C) float32. walk: float32 normalized LFSR walk from state 1 (its length covers
// every position + C*P); position: int32 table state -> index in the walk (so U(s) = walk[pos(s) + 1 ...]).
void seedlm_decode_cpu(uintptr_t seeds, uintptr_t q, uintptr_t e, int64_t n, int C, int P, uintptr_t walk,
                       uintptr_t position, uintptr_t out, int num_threads);

// y (m, n_out) = x (m, k) . W^T, W (n_out, k) the row-major weight whose flattened values are the decoded
// blocks; W is rebuilt a tile of output rows at a time (never whole). x and y float32, contiguous.
void seedlm_linear_cpu(uintptr_t x, int64_t m, int64_t k, int64_t n_out, uintptr_t seeds, uintptr_t q, uintptr_t e,
                       int C, int P, uintptr_t walk, uintptr_t position, uintptr_t y, int num_threads);

}  // namespace forge

namespace forge {

// Dot product of two float32 arrays (16 lanes, vectorized clones); shared by the codec kernels.
float dot_f32(const float* a, const float* b, int64_t n);

// Vector-quantized weights (VPTQ layout, Liu et al. 2024): W (out, in) is cut into vectors of v consecutive
// output rows of one input column; vector (g, j) = codebook[idx[g, j]] (+ res_codebook[res_idx[g, j]]),
// W[g v + r, j] = scale[j] * vector[r] (rows past out dropped). idx, res_idx int32 (ceil(out / v), in);
// codebooks float32 (k, v); res_idx = 0 (null) for none.
void vq_decode_cpu(uintptr_t idx, uintptr_t codebook, uintptr_t res_idx, uintptr_t res_codebook, uintptr_t scale,
                   int64_t out, int64_t in, int v, uintptr_t w, int num_threads);

// y (m, out) = x (m, in) . W^T with W rebuilt v rows at a time (never whole); x, y float32 contiguous.
void vq_linear_cpu(uintptr_t x, int64_t m, uintptr_t idx, uintptr_t codebook, uintptr_t res_idx,
                   uintptr_t res_codebook, uintptr_t scale, int64_t out, int64_t in, int v, uintptr_t y,
                   int num_threads);

}  // namespace forge
