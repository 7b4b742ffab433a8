#pragma once
#include <cstdint>
#include <vector>

namespace forge {

// Newton-Schulz of `batch` small row-major float32 matrices (rows x cols, contiguous) from `in` into `out`,
// one call for the whole iteration: X0 = G / (||G||_F + eps) (the norm summed in double, so it cannot
// overflow), transposed when tall, then X <- a X + (b A + c A A) X with A = X X^T for each (a, b, c) triple
// in `coefficients` (flat). For matrices so small that the per-call cost of ~20 torch ops is most of the work.
// Returns false if some input matrix has a NaN or Inf (its output is then NaN, as the reference gives).
bool newton_schulz_small_f32(uintptr_t in, uintptr_t out, int64_t batch, int64_t rows, int64_t cols,
                             const std::vector<double>& coefficients, double eps, int num_threads);

}  // namespace forge
