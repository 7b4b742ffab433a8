#include "cpu/kl_div.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu/common.h"

namespace forge {
namespace {

// Logits converted to float a block at a time: 2 x 4 KiB stay in L1 while the block is reduced.
constexpr int64_t kBlock = 1024;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FORGE_VECTOR_CLONES
#endif
// The row helpers are inlined into each clone, so their loops are compiled for the clone's ISA.
#define FORGE_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 that the compiler vectorizes: Cephes expf's range reduction and degree-6
// polynomial (about 1 ulp), 2^n built from the exponent bits. Below -87.3 it returns 0 (so -inf
// gives 0); NaN stays NaN.
FORGE_INLINE float exp_nonpositive(float x) {
  float c = x < -87.3f ? -87.3f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float n = (c * 1.44269504088896341f + round_magic) - round_magic;
  float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.3f ? 0.0f : y * scale;
}

// Float -> T for the gradient stores. For bf16 the same rounding as common.h's from_float (nearest
// even, NaN stays a quiet NaN) written with a select instead of a branch, so the store loop vectorizes.
template <typename T>
FORGE_INLINE T store_value(float x) { return from_float<T>(x); }
template <>
FORGE_INLINE bf16 store_value<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  uint32_t is_nan = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);  // all ones for NaN
  return bf16{static_cast<uint16_t>((quiet_nan & is_nan) | (rounded & ~is_nan))};
}

// Rescale factor exp(old - now) of a running sum whose maximum moved from old to now (0 from -inf).
inline float rescale(float old_max, float new_max) {
  return old_max == kNegInf ? 0.0f : std::exp(old_max - new_max);
}

struct RowStats {
  float ms = kNegInf, zs = 0.0f;           // student: running max and sum of exp(x - ms)
  float mt = kNegInf, zt = 0.0f, a = 0.0f;  // teacher, and sum of exp(y - mt) * (y - x)
};

// Loads a block as float (times 1/T) into xs, xt; returns the block maxima (NaN never wins a max;
// it reaches the sums through exp instead).
template <typename T>
FORGE_INLINE void load_block(const T* s, const T* t, int64_t n, float inv_t, float* __restrict xs, float* __restrict xt,
                       float& bs, float& bt) {
  float ms = kNegInf, mt = kNegInf;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t i = 0; i < n; ++i) {
    float x = to_float(s[i]) * inv_t, y = to_float(t[i]) * inv_t;
    xs[i] = x;
    xt[i] = y;
    ms = x > ms ? x : ms;
    mt = y > mt ? y : mt;
  }
  bs = ms;
  bt = mt;
}

template <typename T>
FORGE_INLINE void forward_row(const T* s, const T* t, int64_t vocab, float inv_t, float* loss, float* lse_s, float* lse_t) {
  alignas(64) float xs[kBlock];
  alignas(64) float xt[kBlock];
  RowStats st;
  for (int64_t j = 0; j < vocab; j += kBlock) {
    int64_t n = std::min(kBlock, vocab - j);
    float bs, bt;
    load_block(s + j, t + j, n, inv_t, xs, xt, bs, bt);
    float ms = std::max(st.ms, bs), mt = std::max(st.mt, bt);
    float fs = rescale(st.ms, ms), ft = rescale(st.mt, mt);
    st.zs *= fs;
    st.zt *= ft;
    st.a *= ft;
    st.ms = ms;
    st.mt = mt;
    float zs = 0.0f, zt = 0.0f, a = 0.0f;
#pragma omp simd reduction(+ : zs, zt, a)
    for (int64_t i = 0; i < n; ++i) {
      float es = exp_nonpositive(xs[i] - ms), et = exp_nonpositive(xt[i] - mt);
      zs += es;
      zt += et;
      a += et > 0.0f ? et * (xt[i] - xs[i]) : 0.0f;  // p_i = 0 contributes 0 even where t_i = -inf
    }
    st.zs += zs;
    st.zt += zt;
    st.a += a;
  }
  // KL = E_p[y - x] - (lse_t - lse_s); the difference of the log-sum-exps taken as (mt - ms) + log(zt/zs)
  // so that it does not lose the digits of two large, nearly equal numbers.
  *loss = st.a / st.zt - (st.mt - st.ms) - std::log(st.zt / st.zs);
  *lse_s = st.ms + std::log(st.zs);
  *lse_t = st.mt + std::log(st.zt);
}

template <typename T>
FORGE_INLINE void backward_row(const T* s, const T* t, T* g, int64_t vocab, float inv_t, float ls, float lt, float scale) {
  alignas(64) float xs[kBlock];
  alignas(64) float xt[kBlock];
  for (int64_t j = 0; j < vocab; j += kBlock) {
    int64_t n = std::min(kBlock, vocab - j);
    if (scale == 0.0f) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) g[j + i] = from_float<T>(0.0f);
      continue;
    }
    float bs, bt;
    load_block(s + j, t + j, n, inv_t, xs, xt, bs, bt);  // the whole block is read before g is written
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[j + i] = store_value<T>((exp_nonpositive(xs[i] - ls) - exp_nonpositive(xt[i] - lt)) * scale);
    }
  }
}

#define FORGE_DEFINE_KL(SUFFIX, T)                                                                             \
  FORGE_VECTOR_CLONES void forward_rows_##SUFFIX(const void* s, const void* t, const uint8_t* mask, float* loss, \
                                                 float* lse_s, float* lse_t, int64_t begin, int64_t end,       \
                                                 int64_t vocab, int64_t ss, int64_t ts, float inv_t) {         \
    float unused_s, unused_t;                                                                                  \
    for (int64_t r = begin; r < end; ++r) {                                                                    \
      float* ls = lse_s ? lse_s + r : &unused_s;                                                               \
      float* lt = lse_t ? lse_t + r : &unused_t;                                                               \
      if (mask && !mask[r]) {                                                                                  \
        loss[r] = *ls = *lt = 0.0f;                                                                            \
        continue;                                                                                              \
      }                                                                                                        \
      forward_row<T>(static_cast<const T*>(s) + r * ss, static_cast<const T*>(t) + r * ts, vocab, inv_t,      \
                     loss + r, ls, lt);                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  FORGE_VECTOR_CLONES void backward_rows_##SUFFIX(const void* s, const void* t, void* g, const float* ls,      \
                                                  const float* lt, const float* scale, int64_t begin,          \
                                                  int64_t end, int64_t vocab, int64_t ss, int64_t ts,          \
                                                  int64_t gs, float inv_t) {                                   \
    for (int64_t r = begin; r < end; ++r) {                                                                    \
      backward_row<T>(static_cast<const T*>(s) + r * ss, static_cast<const T*>(t) + r * ts,                   \
                      static_cast<T*>(g) + r * gs, vocab, inv_t, ls[r], lt[r], scale[r]);                      \
    }                                                                                                          \
  }

FORGE_DEFINE_KL(f32, float)
FORGE_DEFINE_KL(bf16, bf16)
FORGE_DEFINE_KL(f16, f16)

using ForwardFn = void (*)(const void*, const void*, const uint8_t*, float*, float*, float*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, float);
using BackwardFn = void (*)(const void*, const void*, void*, const float*, const float*, const float*, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float);
const ForwardFn kForward[3] = {forward_rows_f32, forward_rows_bf16, forward_rows_f16};
const BackwardFn kBackward[3] = {backward_rows_f32, backward_rows_bf16, backward_rows_f16};

void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("forge._C.kl_div: bad dtype code");
}

// Rows per thread: at least 64 Ki logits, so a thread start (~20 us) is never the larger cost.
int64_t min_rows_per_thread(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, vocab)); }

}  // namespace

void kl_div_forward_cpu(uintptr_t student, uintptr_t teacher, uintptr_t mask, uintptr_t loss, uintptr_t lse_s,
                        uintptr_t lse_t, int64_t rows, int64_t vocab, int64_t s_stride, int64_t t_stride, int dtype,
                        float inv_t, int num_threads) {
  check_dtype(dtype);
  ForwardFn fn = kForward[dtype];
  parallel_for(rows, num_threads, min_rows_per_thread(vocab), [&](int64_t begin, int64_t end) {
    fn(reinterpret_cast<const void*>(student), reinterpret_cast<const void*>(teacher),
       reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<float*>(loss), reinterpret_cast<float*>(lse_s),
       reinterpret_cast<float*>(lse_t), begin, end, vocab, s_stride, t_stride, inv_t);
  });
}

double kl_div_reduce_cpu(uintptr_t loss, uintptr_t mask, int64_t rows, int64_t vocab, int reduction, uintptr_t out) {
  if (reduction < 1 || reduction > 3) throw std::invalid_argument("forge._C.kl_div_reduce: bad reduction code");
  const float* values = reinterpret_cast<const float*>(loss);
  const uint8_t* keep = reinterpret_cast<const uint8_t*>(mask);
  double total = 0.0;
  int64_t kept = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += values[r];
    kept += keep ? (keep[r] != 0) : 1;
  }
  float sum = static_cast<float>(total);
  float divisor = 1.0f;
  if (reduction != 1) divisor = static_cast<float>(std::max<int64_t>(kept, 1) * (reduction == 2 ? vocab : 1));
  *reinterpret_cast<float*>(out) = reduction == 1 ? sum : sum / divisor;
  return divisor;
}

double kl_div_loss_cpu(uintptr_t student, uintptr_t teacher, uintptr_t mask, int64_t rows, int64_t vocab,
                       int64_t s_stride, int64_t t_stride, int dtype, float inv_t, int reduction, uintptr_t out,
                       int num_threads) {
  float small[64];
  std::vector<float> large(rows > 64 ? rows : 0);
  float* losses = rows > 64 ? large.data() : small;
  kl_div_forward_cpu(student, teacher, mask, reinterpret_cast<uintptr_t>(losses), 0, 0, rows, vocab, s_stride,
                     t_stride, dtype, inv_t, num_threads);
  return kl_div_reduce_cpu(reinterpret_cast<uintptr_t>(losses), mask, rows, vocab, reduction, out);
}

void kl_div_backward_cpu(uintptr_t student, uintptr_t teacher, uintptr_t lse_s, uintptr_t lse_t, uintptr_t row_scale,
                         uintptr_t grad, int64_t rows, int64_t vocab, int64_t s_stride, int64_t t_stride,
                         int64_t g_stride, int dtype, float inv_t, int num_threads) {
  check_dtype(dtype);
  BackwardFn fn = kBackward[dtype];
  parallel_for(rows, num_threads, min_rows_per_thread(vocab), [&](int64_t begin, int64_t end) {
    fn(reinterpret_cast<const void*>(student), reinterpret_cast<const void*>(teacher), reinterpret_cast<void*>(grad),
       reinterpret_cast<const float*>(lse_s), reinterpret_cast<const float*>(lse_t),
       reinterpret_cast<const float*>(row_scale), begin, end, vocab, s_stride, t_stride, g_stride, inv_t);
  });
}

}  // namespace forge
