// Vector-quantized decode and the fused VQ linear layer (layout: csrc/cpu/seedlm.h).
#include <vector>

#include "cpu/common.h"
#include "cpu/seedlm.h"

namespace forge {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_VQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FORGE_VQ_CLONES
#endif

struct VQ {
  const int32_t* idx;
  const float* codebook;
  const int32_t* res_idx;       // null: no residual codebook
  const float* res_codebook;
  int64_t out, in;
  int v;
};

// Rows [g v, g v + rows) of W without the column scale, row-major into tile (rows x in).
void decode_group(const VQ& q, int64_t g, int64_t rows, float* tile) {
  for (int64_t j = 0; j < q.in; ++j) {
    const float* a = q.codebook + static_cast<int64_t>(q.idx[g * q.in + j]) * q.v;
    const float* b = q.res_idx ? q.res_codebook + static_cast<int64_t>(q.res_idx[g * q.in + j]) * q.v : nullptr;
    for (int64_t r = 0; r < rows; ++r) tile[r * q.in + j] = b ? a[r] + b[r] : a[r];
  }
}

VQ make_vq(uintptr_t idx, uintptr_t codebook, uintptr_t res_idx, uintptr_t res_codebook, int64_t out, int64_t in,
           int v) {
  return VQ{reinterpret_cast<const int32_t*>(idx), reinterpret_cast<const float*>(codebook),
            reinterpret_cast<const int32_t*>(res_idx), reinterpret_cast<const float*>(res_codebook), out, in, v};
}

}  // namespace

void vq_decode_cpu(uintptr_t idx, uintptr_t codebook, uintptr_t res_idx, uintptr_t res_codebook, uintptr_t scale,
                   int64_t out, int64_t in, int v, uintptr_t w, int num_threads) {
  const VQ q = make_vq(idx, codebook, res_idx, res_codebook, out, in, v);
  const float* s = reinterpret_cast<const float*>(scale);
  float* ws = reinterpret_cast<float*>(w);
  const int64_t groups = (out + v - 1) / v;
  parallel_for(groups, num_threads, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, in * v)),
               [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rows = std::min<int64_t>(v, out - g * v);
      float* tile = ws + g * v * in;
      decode_group(q, g, rows, tile);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < in; ++j) tile[r * in + j] *= s[j];
    }
  });
}

namespace {

constexpr int kRowsAtOnce = 8;  // activation rows per pass: their accumulators stay in registers

// y rows [i0, i0 + mt) of output group g: acc[i][r] = sum_j x'[i, j] (C[idx[g, j]] + C_res[res[g, j]])[r],
// the codeword read once per (g, j) and applied to every activation row; no tile of W is formed.
template <int VT>
__attribute__((always_inline)) inline void group_rows(const VQ& q, const float* xs, int64_t i0, int64_t mt,
                                                      int64_t g, float* y) {
  const int v = VT ? VT : q.v;
  float acc[kRowsAtOnce][VT ? VT : 64] = {};
  const int32_t* idx = q.idx + g * q.in;
  const int32_t* res = q.res_idx ? q.res_idx + g * q.in : nullptr;
  for (int64_t j = 0; j < q.in; ++j) {
    float vec[VT ? VT : 64];
    const float* a = q.codebook + static_cast<int64_t>(idx[j]) * v;
    for (int r = 0; r < v; ++r) vec[r] = a[r];
    if (res) {
      const float* b = q.res_codebook + static_cast<int64_t>(res[j]) * v;
      for (int r = 0; r < v; ++r) vec[r] += b[r];
    }
    for (int64_t i = 0; i < mt; ++i) {
      const float xv = xs[(i0 + i) * q.in + j];
      for (int r = 0; r < v; ++r) acc[i][r] += xv * vec[r];
    }
  }
  const int64_t rows = std::min<int64_t>(v, q.out - g * v);
  for (int64_t i = 0; i < mt; ++i)
    for (int64_t r = 0; r < rows; ++r) y[(i0 + i) * q.out + g * v + r] = acc[i][r];
}

#define FORGE_VQ_GROUPS(NAME, VT)                                                                            \
  FORGE_VQ_CLONES void NAME(const VQ& q, const float* xs, int64_t m, int64_t g0, int64_t g1, float* y) {     \
    for (int64_t g = g0; g < g1; ++g)                                                                        \
      for (int64_t i0 = 0; i0 < m; i0 += kRowsAtOnce)                                                        \
        group_rows<VT>(q, xs, i0, std::min<int64_t>(kRowsAtOnce, m - i0), g, y);                             \
  }
FORGE_VQ_GROUPS(groups_v8, 8)
FORGE_VQ_GROUPS(groups_v4, 4)
FORGE_VQ_GROUPS(groups_any, 0)

}  // namespace

// vectors longer than 64 values take the tile path of vq_decode; the Python wrapper routes them there.
void vq_linear_cpu(uintptr_t x, int64_t m, uintptr_t idx, uintptr_t codebook, uintptr_t res_idx,
                   uintptr_t res_codebook, uintptr_t scale, int64_t out, int64_t in, int v, uintptr_t y,
                   int num_threads) {
  const VQ q = make_vq(idx, codebook, res_idx, res_codebook, out, in, v);
  const float* xs = reinterpret_cast<const float*>(x);
  const float* s = reinterpret_cast<const float*>(scale);
  std::vector<float> xscaled(static_cast<size_t>(m * in));  // x . diag(scale): the column scale folded into x
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < in; ++j) xscaled[i * in + j] = xs[i * in + j] * s[j];
  auto groups = v == 8 ? groups_v8 : v == 4 ? groups_v4 : groups_any;
  parallel_for((out + v - 1) / v, num_threads, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, in * v)),
               [&](int64_t g0, int64_t g1) { groups(q, xscaled.data(), m, g0, g1, reinterpret_cast<float*>(y)); });
}

}  // namespace forge
