#pragma once
#include <cstdint>

namespace forge {

// BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764) kernels on raw pointers; the Python wrapper in
// forge/ops/bitnet.py checks dtype, shape and contiguity. Float dtype codes: csrc/cpu/common.h.

// Absmean ternary quantization of `groups` contiguous groups of `group_size` values:
//   scale_g = max(mean|w_g|, eps) ;  q = clamp(round(w / scale_g), -1, 1)
// Writes scale (float32, one per group) and, by `dequantize`, q as int8 or q * scale in w's dtype.
void ternary_quant_cpu(uintptr_t w, int dtype, int64_t groups, int64_t group_size, float eps, uintptr_t scale,
                       uintptr_t out, bool dequantize, int num_threads);

// Per-token absmax int8 quantization of a (rows, cols) matrix:
//   s = max(max|x_row|, eps) / 127 ;  q = clamp(round(x / s), -127, 127)
// Writes s (float32 per row; scale may be 0 when it is not wanted) and q as int8 (row stride out_stride) or q * s
// in x's dtype. A row holding NaN or Inf (s NaN or Inf) gets q = 0, and q * s = NaN, as the reference has it.
void act_quant_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, float eps, uintptr_t scale, uintptr_t out,
                   int64_t out_stride, bool dequantize, int num_threads);

// 2-bit packing, 4 weights a byte, planar layout: with kb = ceil(cols / 4), weight k of a row sits in
// byte k % kb at bits 2 * (k / kb), stored as code q + 1 (0, 1, 2); padding weights are 0 (code 1).
void pack_ternary_cpu(uintptr_t q, int64_t rows, int64_t cols, uintptr_t packed, int num_threads);
void unpack_ternary_cpu(uintptr_t packed, int64_t rows, int64_t cols, uintptr_t q, int num_threads);

// y (m, n) = x (m, k) . W^T from packed ternary W (n, kb): x quantized per token to int8, integer dot
// products with the 2-bit codes decoded on the fly, y = (acc * s_x[m]) * scale[n * scale_stride]. A token row
// holding NaN or Inf has q = 0 and s_x NaN or Inf, so its outputs are NaN (0 * Inf), as in the reference.
void ternary_linear_cpu(uintptr_t x, int dtype, int64_t m, int64_t k, uintptr_t packed, int64_t n,
                        uintptr_t scale, int64_t scale_stride, float eps, uintptr_t y, int num_threads);

}  // namespace forge
