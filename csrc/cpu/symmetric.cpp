#include "cpu/symmetric.h"

#include <algorithm>

#include "cpu/common.h"

namespace forge {

namespace {
constexpr int64_t kTile = 64;  // 64 x 64 floats = 16 KiB per tile: source and target tiles fit L1+L2
}

void symmetrize_from_lower_f32(uintptr_t data, int64_t batch, int64_t m, int num_threads) {
  const int64_t tiles = (m + kTile - 1) / kTile;
  // Work items: (matrix, tile row ti, tile column tj) with tj >= ti, i.e. tiles touching the upper part.
  const int64_t per_matrix = tiles * (tiles + 1) / 2;
  float* base = reinterpret_cast<float*>(data);
  parallel_for(batch * per_matrix, num_threads, 8, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      int64_t b = w / per_matrix, k = w % per_matrix;
      int64_t ti = 0;
      while (k >= tiles - ti) { k -= tiles - ti; ++ti; }
      int64_t tj = ti + k;
      float* mat = base + b * m * m;
      int64_t r0 = ti * kTile, r1 = std::min(m, r0 + kTile);
      int64_t c0 = tj * kTile, c1 = std::min(m, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = std::max(c0, r + 1); c < c1; ++c) mat[r * m + c] = mat[c * m + r];
      }
    }
  });
}

}  // namespace forge
