#pragma once
#include <cstdint>
#include <vector>

namespace forge {

// Grokfast EMA filter (Lee et al. 2024, arXiv 2405.20233), in place over a list of tensors:
//   ema <- alpha * ema + (1 - alpha) * g ;  g <- g + lamb * ema
void grokfast_ema_cpu(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& emas,
                      const std::vector<int64_t>& numels, const std::vector<int>& grad_dtypes,
                      const std::vector<int>& ema_dtypes, float alpha, float lamb, int num_threads);

// Grokfast moving-average filter with a running sum, O(1) per step whatever the window:
//   old = ring[slot] ; ring[slot] = g ; sum <- sum + g - old ; g <- g + lamb * scale * sum
// scale is 1 / (values in the window), or 0 while warming up.
void grokfast_ma_cpu(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& rings,
                     const std::vector<uintptr_t>& sums, const std::vector<int64_t>& numels,
                     const std::vector<int>& grad_dtypes, const std::vector<int>& ring_dtypes,
                     int64_t slot, float scale, float lamb, int num_threads);

}  // namespace forge
