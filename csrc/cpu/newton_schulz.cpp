#include "cpu/newton_schulz.h"

#include <cmath>

#include "cpu/common.h"

namespace forge {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_NS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FORGE_NS_CLONES
#endif
#define FORGE_INLINE inline __attribute__((always_inline))

FORGE_INLINE float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < n; ++l) s += x[l] * y[l];
  return s;
}

// y = alpha * x + beta * y over n floats.
FORGE_INLINE void axpby(float alpha, const float* __restrict x, float beta, float* __restrict y, int64_t n) {
#pragma GCC ivdep
  for (int64_t l = 0; l < n; ++l) y[l] = alpha * x[l] + beta * y[l];
}

// One quintic step: Y = a X + (b A + c A A) X with A = X X^T (m x m, symmetric, so A A = A A^T).
FORGE_INLINE void ns_step(const float* X, float* Y, float* A, float* B, int64_t m, int64_t n, float a, float b,
                          float c) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j <= i; ++j) A[i * m + j] = A[j * m + i] = dot(X + i * n, X + j * n, n);
  }
  for (int64_t i = 0; i < m; ++i) {
    float* Bi = B + i * m;
    for (int64_t j = 0; j < m; ++j) Bi[j] = b * A[i * m + j];
    for (int64_t k = 0; k < m; ++k) axpby(c * A[i * m + k], A + k * m, 1.0f, Bi, m);
  }
  for (int64_t i = 0; i < m; ++i) {
    float* Yi = Y + i * n;
    for (int64_t l = 0; l < n; ++l) Yi[l] = a * X[i * n + l];
    for (int64_t k = 0; k < m; ++k) axpby(B[i * m + k], X + k * n, 1.0f, Yi, n);
  }
}

// The whole iteration on one matrix: X (m x n, m <= n) in, the result in X or Y (returned).
FORGE_NS_CLONES float* ns_matrix(float* X, float* Y, float* A, float* B, int64_t m, int64_t n, const double* coef,
                                 int64_t steps) {
  for (int64_t s = 0; s < steps; ++s) {
    ns_step(X, Y, A, B, m, n, static_cast<float>(coef[3 * s]), static_cast<float>(coef[3 * s + 1]),
            static_cast<float>(coef[3 * s + 2]));
    std::swap(X, Y);
  }
  return X;
}

// X = G / (||G||_F + eps), transposed when tall (rows > cols); false if the norm is not finite.
bool load_normalized(const float* G, float* X, int64_t rows, int64_t cols, double eps) {
  double sum = 0.0;
  for (int64_t l = 0; l < rows * cols; ++l) sum += static_cast<double>(G[l]) * G[l];
  const double norm = std::sqrt(sum);
  const float scale = static_cast<float>(1.0 / (norm + eps));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = G[r * cols + c] * scale;
      if (rows > cols) X[c * rows + r] = v; else X[r * cols + c] = v;
    }
  }
  return std::isfinite(norm);
}

}  // namespace

bool newton_schulz_small_f32(uintptr_t in, uintptr_t out, int64_t batch, int64_t rows, int64_t cols,
                             const std::vector<double>& coefficients, double eps, int num_threads) {
  const int64_t m = std::min(rows, cols), n = std::max(rows, cols), size = rows * cols;
  const int64_t steps = static_cast<int64_t>(coefficients.size()) / 3;
  const float* G = reinterpret_cast<const float*>(in);
  float* O = reinterpret_cast<float*>(out);
  std::vector<char> finite(batch, 1);
  const int64_t per_thread = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, m * m * n));
  parallel_for(batch, num_threads, per_thread, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * size + 2 * m * m);
    float *X = scratch.data(), *Y = X + size, *A = Y + size, *B = A + m * m;
    for (int64_t k = begin; k < end; ++k) {
      finite[k] = load_normalized(G + k * size, X, rows, cols, eps);
      const float* R = ns_matrix(X, Y, A, B, m, n, coefficients.data(), steps);
      float* dst = O + k * size;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = rows > cols ? R[c * rows + r] : R[r * cols + c];
      }
    }
  });
  for (char f : finite) {
    if (!f) return false;
  }
  return true;
}

}  // namespace forge
