#include "cpu/bitnet.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/common.h"

namespace forge {
namespace {

constexpr int kLanes = 16;             // independent accumulators: lets the compiler vectorize reductions
constexpr int64_t kChunk = 1 << 15;    // 32 Ki values a task for the per-tensor passes (128 KiB fp32)
// Values a thread must get before the quantization passes use it: they run at about 0.3 ns a value, and starting
// and joining a thread costs 20 us on some machines and 60-100 us on others (a 2-core KVM EPYC), so 2^18 values
// (~80 us) is where a second thread stops losing (act_quant 3072x96 fp32 there: 103 us on 1 thread, 183 us on 2
// with 2^16 as the bound).
constexpr int64_t kMinPerThread = int64_t{1} << 18;

// AVX-512 / AVX2 clones picked at load time where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_BITNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FORGE_BITNET_CLONES
#endif

// round half to even (torch.round), then clamp; NaN becomes lo (its scale carries the NaN).
inline float round_clip(float v, float lo, float hi) {
  v = std::nearbyint(v);
  v = v >= lo ? v : lo;
  return v <= hi ? v : hi;
}

// Sum of |w| in double lanes: agrees with torch's float64 sum to the last float bit in practice.
template <typename T>
inline double abs_sum(const T* __restrict w, int64_t n) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)  // [simd]
    for (int l = 0; l < kLanes; ++l) lanes[l] += std::fabs(to_float(w[i + l]));
  double total = 0.0;
  for (; i < n; ++i) total += std::fabs(to_float(w[i]));
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// max |x|, NaN-propagating like torch.amax. One `omp simd` loop (max and or reductions): the NaN test kept apart
// from the max, with no branch, so it vectorizes on every clone (the per-lane select with `||` it replaced stayed
// scalar on both, 4 ns a value). Loops marked [simd] must vectorize on both clones: tests/test_vectorization.py.
template <typename T>
inline float abs_max(const T* __restrict x, int64_t n) {
  float best = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)  // [simd] (GCC reports omp simd loops at the pragma)
  for (int64_t i = 0; i < n; ++i) {
    float v = std::fabs(to_float(x[i]));
    best = v > best ? v : best;
    nan |= v != v;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

template <typename T>
inline void quantize_to_int8(const T* __restrict x, int64_t n, float scale, float bound, int8_t* __restrict q) {
  for (int64_t i = 0; i < n; ++i)  // [simd]
    q[i] = static_cast<int8_t>(round_clip(to_float(x[i]) / scale, -bound, bound));
}

template <typename T>
inline void quantize_dequantize(const T* __restrict x, int64_t n, float scale, float bound, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i)  // [simd]
    out[i] = from_float<T>(round_clip(to_float(x[i]) / scale, -bound, bound) * scale);
}

// One vectorized clone per dtype (target_clones does not apply to templates).
#define FORGE_BITNET_DTYPE(SUFFIX, T)                                                                          \
  FORGE_BITNET_CLONES double abs_sum_##SUFFIX(const void* w, int64_t n) { return abs_sum(static_cast<const T*>(w), n); } \
  FORGE_BITNET_CLONES float abs_max_##SUFFIX(const void* x, int64_t n) { return abs_max(static_cast<const T*>(x), n); } \
  FORGE_BITNET_CLONES void quant_##SUFFIX(const void* x, int64_t n, float s, float b, void* q) {                \
    quantize_to_int8(static_cast<const T*>(x), n, s, b, static_cast<int8_t*>(q));                              \
  }                                                                                                            \
  FORGE_BITNET_CLONES void dequant_##SUFFIX(const void* x, int64_t n, float s, float b, void* out) {            \
    quantize_dequantize(static_cast<const T*>(x), n, s, b, static_cast<T*>(out));                              \
  }

FORGE_BITNET_DTYPE(f32, float)
FORGE_BITNET_DTYPE(bf16, bf16)
FORGE_BITNET_DTYPE(f16, f16)

struct DTypeFns {
  double (*abs_sum)(const void*, int64_t);
  float (*abs_max)(const void*, int64_t);
  void (*quant)(const void*, int64_t, float, float, void*);
  void (*dequant)(const void*, int64_t, float, float, void*);
  int64_t size;
};

const DTypeFns& fns(int dtype) {
  static const DTypeFns table[3] = {{abs_sum_f32, abs_max_f32, quant_f32, dequant_f32, 4},
                                    {abs_sum_bf16, abs_max_bf16, quant_bf16, dequant_bf16, 2},
                                    {abs_sum_f16, abs_max_f16, quant_f16, dequant_f16, 2}};
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("forge._C: bad dtype code");
  return table[dtype];
}

inline const char* at(uintptr_t base, int64_t index, int64_t size) {
  return reinterpret_cast<const char*>(base) + index * size;
}

}  // namespace

namespace {

// Splits `groups` groups of `group_size` values into tasks of at most kChunk values.
struct GroupChunks {
  int64_t group_size, per_group, tasks, min_tasks;
  GroupChunks(int64_t groups, int64_t size)
      : group_size(size), per_group((size + kChunk - 1) / kChunk), tasks(groups * per_group),
        min_tasks(std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, std::min(size, kChunk)))) {}
  int64_t group(int64_t task) const { return task / per_group; }
  int64_t offset(int64_t task) const { return group(task) * group_size + (task % per_group) * kChunk; }
  int64_t length(int64_t task) const { return std::min(kChunk, group_size - (task % per_group) * kChunk); }
};

// Sum of |w| per group: double partial sums per task, added in a fixed order (thread-count independent).
void group_abs_means(const DTypeFns& f, uintptr_t w, const GroupChunks& plan, int64_t groups, float eps,
                     float* scale, int num_threads) {
  std::vector<double> partial(plan.tasks);
  parallel_for(plan.tasks, num_threads, plan.min_tasks, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) partial[t] = f.abs_sum(at(w, plan.offset(t), f.size), plan.length(t));
  });
  for (int64_t g = 0; g < groups; ++g) {
    double total = 0.0;
    for (int64_t t = g * plan.per_group; t < (g + 1) * plan.per_group; ++t) total += partial[t];
    float mean = static_cast<float>(total / static_cast<double>(plan.group_size));
    scale[g] = mean < eps ? eps : mean;  // NaN stays NaN
  }
}

// Sum over bytes j >= start of (code_i + 1-shifted weight) * x_i[j] for the four 2-bit fields of p[j].
inline int32_t dot_packed_from(const uint8_t* __restrict p, const int8_t* __restrict x, int64_t kb, int64_t start) {
  int32_t acc = 0;
  for (int64_t j = start; j < kb; ++j) {
    int32_t b = p[j];
    acc += (b & 3) * x[j] + ((b >> 2) & 3) * x[kb + j] + ((b >> 4) & 3) * x[2 * kb + j] + (b >> 6) * x[3 * kb + j];
  }
  return acc;
}

FORGE_BITNET_CLONES int32_t dot_packed_compiled(const uint8_t* __restrict p, const int8_t* __restrict x, int64_t kb) {
  return dot_packed_from(p, x, kb, 0);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FORGE_HAVE_MADDUBS 1
// AVX2 by hand: vpmaddubsw multiplies 32 unsigned codes (0..2) by 32 int8 activations and adds pairs into int16
// (at most 4 x 2 x 2 x 127 = 2032 after the four fields: no saturation), vpmaddwd widens to int32. GCC's own
// AVX2 code for the loop above widens every byte to int32 first and ran at ~1.7x F.linear at batch 1 on a Zen 3.
__attribute__((target("avx2"))) int32_t dot_packed_avx2(const uint8_t* p, const int8_t* x, int64_t kb) {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 32 <= kb; j += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j));
    __m256i sum = _mm256_setzero_si256();
    for (int field = 0; field < 4; ++field) {
      const __m256i code = _mm256_and_si256(_mm256_srli_epi16(b, 2 * field), mask);
      const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + field * kb + j));
      sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(code, xs));
    }
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(sum, ones));
  }
  __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
  half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0xb1));
  return _mm_cvtsi128_si32(half) + dot_packed_from(p, x, kb, j);
}
#endif

// Sum of (w + 1) * x over one packed row: the caller subtracts sum(x). The hand-written AVX2 loop on CPUs without
// AVX-512 (their compiled v4 clone is what RESULTS measured on the Zen 4), the compiler's clones elsewhere.
int32_t dot_packed(const uint8_t* __restrict p, const int8_t* __restrict x, int64_t kb) {
#ifdef FORGE_HAVE_MADDUBS
  static const bool avx2_only = __builtin_cpu_supports("avx2") && !__builtin_cpu_supports("avx512bw");
  if (avx2_only) return dot_packed_avx2(p, x, kb);
#endif
  return dot_packed_compiled(p, x, kb);
}

void store(int dtype, uintptr_t y, int64_t index, float value) {
  if (dtype == kFloat32) reinterpret_cast<float*>(y)[index] = value;
  else if (dtype == kBFloat16) reinterpret_cast<bf16*>(y)[index] = from_float<bf16>(value);
  else reinterpret_cast<f16*>(y)[index] = from_float<f16>(value);
}

// A row holding NaN or Inf has a NaN or Inf scale; as in the reference its q is 0 (x / s is NaN or 0 there, which
// round_clip would send to -127) and its dequantized values q * s are NaN.
void non_finite_row(int dtype, uintptr_t out, int64_t start, int64_t cols, bool dequantize) {
  if (!dequantize) {
    std::memset(reinterpret_cast<int8_t*>(out) + start, 0, static_cast<size_t>(cols));
    return;
  }
  for (int64_t j = 0; j < cols; ++j) store(dtype, out, start + j, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace

void ternary_quant_cpu(uintptr_t w, int dtype, int64_t groups, int64_t group_size, float eps, uintptr_t scale,
                       uintptr_t out, bool dequantize, int num_threads) {
  const DTypeFns& f = fns(dtype);
  if (groups < 1 || group_size < 1) throw std::invalid_argument("forge._C.ternary_quant: empty input");
  GroupChunks plan(groups, group_size);
  float* scales = reinterpret_cast<float*>(scale);
  group_abs_means(f, w, plan, groups, eps, scales, num_threads);
  parallel_for(plan.tasks, num_threads, plan.min_tasks, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t off = plan.offset(t);
      float s = scales[plan.group(t)];
      if (dequantize) f.dequant(at(w, off, f.size), plan.length(t), s, 1.0f, reinterpret_cast<char*>(out) + off * f.size);
      else f.quant(at(w, off, f.size), plan.length(t), s, 1.0f, reinterpret_cast<int8_t*>(out) + off);
    }
  });
}

void act_quant_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, float eps, uintptr_t scale, uintptr_t out,
                   int64_t out_stride, bool dequantize, int num_threads) {
  const DTypeFns& f = fns(dtype);
  float* scales = reinterpret_cast<float*>(scale);
  int64_t min_rows = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, cols));
  parallel_for(rows, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const char* row = at(x, r * cols, f.size);
      float amax = f.abs_max(row, cols);
      float s = (amax < eps ? eps : amax) / 127.0f;
      if (scales) scales[r] = s;
      if (!std::isfinite(s)) non_finite_row(dtype, out, r * out_stride, cols, dequantize);
      else if (dequantize) f.dequant(row, cols, s, 127.0f, reinterpret_cast<char*>(out) + r * out_stride * f.size);
      else f.quant(row, cols, s, 127.0f, reinterpret_cast<int8_t*>(out) + r * out_stride);
    }
  });
}

void pack_ternary_cpu(uintptr_t q, int64_t rows, int64_t cols, uintptr_t packed, int num_threads) {
  const int64_t kb = (cols + 3) / 4;
  parallel_for(rows, num_threads, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cols)),
               [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* qr = reinterpret_cast<const int8_t*>(q) + r * cols;
      uint8_t* pr = reinterpret_cast<uint8_t*>(packed) + r * kb;
      for (int64_t j = 0; j < kb; ++j) {
        uint32_t byte = 0;
        for (int i = 0; i < 4; ++i) {
          int64_t k = i * kb + j;
          byte |= static_cast<uint32_t>(k < cols ? qr[k] + 1 : 1) << (2 * i);
        }
        pr[j] = static_cast<uint8_t>(byte);
      }
    }
  });
}

void unpack_ternary_cpu(uintptr_t packed, int64_t rows, int64_t cols, uintptr_t q, int num_threads) {
  const int64_t kb = (cols + 3) / 4;
  parallel_for(rows, num_threads, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cols)),
               [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* pr = reinterpret_cast<const uint8_t*>(packed) + r * kb;
      int8_t* qr = reinterpret_cast<int8_t*>(q) + r * cols;
      for (int i = 0; i < 4; ++i)
        for (int64_t j = 0; j < kb && i * kb + j < cols; ++j) qr[i * kb + j] = static_cast<int8_t>(((pr[j] >> (2 * i)) & 3) - 1);
    }
  });
}

void ternary_linear_cpu(uintptr_t x, int dtype, int64_t m, int64_t k, uintptr_t packed, int64_t n,
                        uintptr_t scale, int64_t scale_stride, float eps, uintptr_t y, int num_threads) {
  const int64_t kb = (k + 3) / 4;
  std::vector<int8_t> xq(static_cast<size_t>(m * 4 * kb), 0);  // zero padding meets the padding codes
  std::vector<float> xs(m);
  std::vector<int32_t> xsum(m, 0);
  act_quant_cpu(x, dtype, m, k, eps, reinterpret_cast<uintptr_t>(xs.data()), reinterpret_cast<uintptr_t>(xq.data()),
                4 * kb, false, num_threads);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < k; ++j) xsum[r] += xq[r * 4 * kb + j];
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed);
  const float* ws = reinterpret_cast<const float*>(scale);
  parallel_for(n, num_threads, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, kb * m)),
               [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* p = w + row * kb;
      for (int64_t r = 0; r < m; ++r) {
        int32_t acc = dot_packed(p, xq.data() + r * 4 * kb, kb) - xsum[r];
        store(dtype, y, r * n + row, (static_cast<float>(acc) * xs[r]) * ws[row * scale_stride]);
      }
    }
  });
}

}  // namespace forge
