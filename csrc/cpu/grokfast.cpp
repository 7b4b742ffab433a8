#include "cpu/grokfast.h"

#include <stdexcept>

#include "cpu/common.h"

namespace forge {
namespace {

constexpr int64_t kChunk = 1 << 16;  // 64 Ki elements: 256-768 KiB of traffic, fits L2

// x86-64-v3 (AVX2 + FMA + F16C) clone picked at load time where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FORGE_VECTOR_CLONES
#endif

template <typename G, typename S>
inline void ema_chunk(G* __restrict g, S* __restrict e, int64_t n, float alpha, float lamb) {
  const float beta = 1.0f - alpha;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float gi = to_float(g[i]);
    float ei = alpha * to_float(e[i]) + beta * gi;
    S es = from_float<S>(ei);
    e[i] = es;
    g[i] = from_float<G>(gi + lamb * to_float(es));
  }
}

template <typename G, typename R>
inline void ma_chunk(G* __restrict g, R* __restrict ring, float* __restrict sum, int64_t n, float scale,
                     float lamb) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float gi = to_float(g[i]);
    R stored = from_float<R>(gi);
    float s = sum[i] + (to_float(stored) - to_float(ring[i]));
    ring[i] = stored;
    sum[i] = s;
    g[i] = from_float<G>(gi + lamb * scale * s);
  }
}

// One instantiation per (grad dtype, state dtype); each gets the vector clone.
#define FORGE_DEFINE_EMA(NAME, G, S)                                                          \
  FORGE_VECTOR_CLONES void NAME(void* g, void* e, int64_t n, float alpha, float lamb) {      \
    ema_chunk<G, S>(static_cast<G*>(g), static_cast<S*>(e), n, alpha, lamb);                 \
  }
#define FORGE_DEFINE_MA(NAME, G, R)                                                                  \
  FORGE_VECTOR_CLONES void NAME(void* g, void* r, float* s, int64_t n, float scale, float lamb) {   \
    ma_chunk<G, R>(static_cast<G*>(g), static_cast<R*>(r), s, n, scale, lamb);                     \
  }

FORGE_DEFINE_EMA(ema_f32_f32, float, float)
FORGE_DEFINE_EMA(ema_f32_bf16, float, bf16)
FORGE_DEFINE_EMA(ema_f32_f16, float, f16)
FORGE_DEFINE_EMA(ema_bf16_f32, bf16, float)
FORGE_DEFINE_EMA(ema_bf16_bf16, bf16, bf16)
FORGE_DEFINE_EMA(ema_bf16_f16, bf16, f16)
FORGE_DEFINE_EMA(ema_f16_f32, f16, float)
FORGE_DEFINE_EMA(ema_f16_bf16, f16, bf16)
FORGE_DEFINE_EMA(ema_f16_f16, f16, f16)
FORGE_DEFINE_MA(ma_f32_f32, float, float)
FORGE_DEFINE_MA(ma_f32_bf16, float, bf16)
FORGE_DEFINE_MA(ma_f32_f16, float, f16)
FORGE_DEFINE_MA(ma_bf16_f32, bf16, float)
FORGE_DEFINE_MA(ma_bf16_bf16, bf16, bf16)
FORGE_DEFINE_MA(ma_bf16_f16, bf16, f16)
FORGE_DEFINE_MA(ma_f16_f32, f16, float)
FORGE_DEFINE_MA(ma_f16_bf16, f16, bf16)
FORGE_DEFINE_MA(ma_f16_f16, f16, f16)

using EmaFn = void (*)(void*, void*, int64_t, float, float);
using MaFn = void (*)(void*, void*, float*, int64_t, float, float);

// Indexed [grad dtype][state dtype] by the DType codes.
const EmaFn kEma[3][3] = {{ema_f32_f32, ema_f32_bf16, ema_f32_f16},
                          {ema_bf16_f32, ema_bf16_bf16, ema_bf16_f16},
                          {ema_f16_f32, ema_f16_bf16, ema_f16_f16}};
const MaFn kMa[3][3] = {{ma_f32_f32, ma_f32_bf16, ma_f32_f16},
                        {ma_bf16_f32, ma_bf16_bf16, ma_bf16_f16},
                        {ma_f16_f32, ma_f16_bf16, ma_f16_f16}};

int element_size(int code) { return code == kFloat32 ? 4 : 2; }

void check_codes(const std::vector<int>& a, const std::vector<int>& b, size_t n) {
  if (a.size() != n || b.size() != n) throw std::invalid_argument("forge._C: list lengths differ");
  for (size_t i = 0; i < n; ++i) {
    if (a[i] < 0 || a[i] > 2 || b[i] < 0 || b[i] > 2) throw std::invalid_argument("forge._C: bad dtype code");
  }
}

}  // namespace

void grokfast_ema_cpu(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& emas,
                      const std::vector<int64_t>& numels, const std::vector<int>& grad_dtypes,
                      const std::vector<int>& ema_dtypes, float alpha, float lamb, int num_threads) {
  size_t n = grads.size();
  if (emas.size() != n || numels.size() != n) throw std::invalid_argument("forge._C: list lengths differ");
  check_codes(grad_dtypes, ema_dtypes, n);
  ChunkPlan plan = plan_chunks(numels, kChunk);
  parallel_for(static_cast<int64_t>(plan.tensor.size()), num_threads, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int t = plan.tensor[c];
      auto* g = reinterpret_cast<char*>(grads[t]) + plan.offset[c] * element_size(grad_dtypes[t]);
      auto* e = reinterpret_cast<char*>(emas[t]) + plan.offset[c] * element_size(ema_dtypes[t]);
      kEma[grad_dtypes[t]][ema_dtypes[t]](g, e, plan.length[c], alpha, lamb);
    }
  });
}

void grokfast_ma_cpu(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& rings,
                     const std::vector<uintptr_t>& sums, const std::vector<int64_t>& numels,
                     const std::vector<int>& grad_dtypes, const std::vector<int>& ring_dtypes,
                     int64_t slot, float scale, float lamb, int num_threads) {
  size_t n = grads.size();
  if (rings.size() != n || sums.size() != n || numels.size() != n)
    throw std::invalid_argument("forge._C: list lengths differ");
  check_codes(grad_dtypes, ring_dtypes, n);
  ChunkPlan plan = plan_chunks(numels, kChunk);
  parallel_for(static_cast<int64_t>(plan.tensor.size()), num_threads, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int t = plan.tensor[c];
      int64_t off = plan.offset[c];
      auto* g = reinterpret_cast<char*>(grads[t]) + off * element_size(grad_dtypes[t]);
      auto* r = reinterpret_cast<char*>(rings[t]) + (slot * numels[t] + off) * element_size(ring_dtypes[t]);
      auto* s = reinterpret_cast<float*>(sums[t]) + off;
      kMa[grad_dtypes[t]][ring_dtypes[t]](g, r, s, plan.length[c], scale, lamb);
    }
  });
}

}  // namespace forge
