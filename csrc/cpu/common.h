// Shared helpers for forge's CPU kernels: dtype codes, fp16/bf16 conversion, a thread pool loop.
// The kernels take raw pointers and sizes; the Python wrappers check dtype, device and contiguity.
#pragma once
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>

namespace forge {

// Dtype codes shared with forge/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct bf16 { uint16_t bits; };
struct f16 { _Float16 value; };

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16 x) { return static_cast<float>(x.value); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <> inline f16 from_float<f16>(float x) { return f16{static_cast<_Float16>(x)}; }

// Runs body(begin, end) over [0, n) split into contiguous ranges, one per thread.
// Small work stays on the calling thread: a thread start costs ~20 us.
template <typename Body>
void parallel_for(int64_t n, int num_threads, int64_t min_per_thread, Body body) {
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / std::max<int64_t>(1, min_per_thread)));
  if (threads <= 1) {
    body(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  int64_t per = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * per, end = std::min(n, begin + per);
    if (begin < end) pool.emplace_back(body, begin, end);
  }
  body(int64_t{0}, std::min(n, per));
  for (auto& th : pool) th.join();
}

// A list of tensors cut into fixed-size chunks, so threads share the work evenly
// however the sizes are mixed. chunk c covers elements [offset, offset+len) of tensor t.
struct ChunkPlan {
  std::vector<int32_t> tensor;
  std::vector<int64_t> offset;
  std::vector<int64_t> length;
};

inline ChunkPlan plan_chunks(const std::vector<int64_t>& numels, int64_t chunk) {
  ChunkPlan plan;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t off = 0; off < numels[t]; off += chunk) {
      plan.tensor.push_back(static_cast<int32_t>(t));
      plan.offset.push_back(off);
      plan.length.push_back(std::min(chunk, numels[t] - off));
    }
  }
  return plan;
}

}  // namespace forge
