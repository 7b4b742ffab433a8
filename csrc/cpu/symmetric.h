#pragma once
#include <cstdint>

namespace forge {

// For each of `batch` row-major m x m float32 matrices at `data`, copy the strict lower triangle
// onto the strict upper one (C[r][c] = C[c][r] for c > r), in cache-sized tiles, threaded.
// Newton-Schulz's symmetric products compute only the lower blocks; this completes them.
void symmetrize_from_lower_f32(uintptr_t data, int64_t batch, int64_t m, int num_threads);

}  // namespace forge
