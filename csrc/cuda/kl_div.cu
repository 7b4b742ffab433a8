// KL(softmax(t/T) || softmax(s/T)) per row of raw logits, for CUDA (see csrc/cpu/kl_div.h for the math).
// Forward: one block per row; each thread keeps an online softmax (Milakov & Gimelshein 2018) of its
// strided elements for both inputs, then the block merges the states (warp shuffles, then shared memory).
// Backward: a 2-D grid (row, 4096-element tile); each element is read once and its gradient written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace forge {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPerThread = 16;

struct KLState {
  float ms, zs;      // student: running max of x, sum of exp(x - ms)
  float mt, zt, a;   // teacher: running max of y, sum of exp(y - mt), sum of exp(y - mt) * (y - x)
};

__device__ __forceinline__ float rescale(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.0f : __expf(old_max - new_max);
}

__device__ __forceinline__ void add_element(KLState& st, float x, float y) {
  if (x > st.ms) {
    st.zs = st.zs * rescale(st.ms, x) + 1.0f;
    st.ms = x;
  } else if (x != -INFINITY) {  // NaN gets here and turns the sum into NaN
    st.zs += __expf(x - st.ms);
  }
  if (y > st.mt) {
    float f = rescale(st.mt, y);
    st.zt = st.zt * f + 1.0f;
    st.a = st.a * f + (y - x);
    st.mt = y;
  } else if (y != -INFINITY) {
    float e = __expf(y - st.mt);
    st.zt += e;
    st.a += e > 0.0f ? e * (y - x) : 0.0f;
  }
}

__device__ __forceinline__ KLState merge(const KLState& p, const KLState& q) {
  KLState r;
  r.ms = fmaxf(p.ms, q.ms);
  r.zs = p.zs * rescale(p.ms, r.ms) + q.zs * rescale(q.ms, r.ms);
  r.mt = fmaxf(p.mt, q.mt);
  float fp = rescale(p.mt, r.mt), fq = rescale(q.mt, r.mt);
  r.zt = p.zt * fp + q.zt * fq;
  r.a = p.a * fp + q.a * fq;
  return r;
}

__device__ __forceinline__ KLState shuffle_down(const KLState& s, int offset) {
  KLState o;
  o.ms = __shfl_down_sync(0xffffffffu, s.ms, offset);
  o.zs = __shfl_down_sync(0xffffffffu, s.zs, offset);
  o.mt = __shfl_down_sync(0xffffffffu, s.mt, offset);
  o.zt = __shfl_down_sync(0xffffffffu, s.zt, offset);
  o.a = __shfl_down_sync(0xffffffffu, s.a, offset);
  return o;
}

template <typename T>
__global__ void kl_forward_kernel(const T* __restrict s, const T* __restrict t, const uint8_t* __restrict mask,
                                  float* __restrict loss, float* __restrict lse_s, float* __restrict lse_t,
                                  int64_t vocab, int64_t ss, int64_t ts, float inv_t) {
  __shared__ KLState warp_states[kForwardThreads / 32];
  const int64_t row = blockIdx.x;
  if (mask != nullptr && mask[row] == 0) {
    if (threadIdx.x == 0) loss[row] = lse_s[row] = lse_t[row] = 0.0f;
    return;
  }
  const T* srow = s + row * ss;
  const T* trow = t + row * ts;
  KLState st{-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f};
  for (int64_t i = threadIdx.x; i < vocab; i += kForwardThreads) {
    add_element(st, static_cast<float>(srow[i]) * inv_t, static_cast<float>(trow[i]) * inv_t);
  }
  for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shuffle_down(st, offset));
  if ((threadIdx.x & 31) == 0) warp_states[threadIdx.x >> 5] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    KLState r = warp_states[0];
    for (int w = 1; w < kForwardThreads / 32; ++w) r = merge(r, warp_states[w]);
    loss[row] = r.a / r.zt - (r.mt - r.ms) - logf(r.zt / r.zs);
    lse_s[row] = r.ms + logf(r.zs);
    lse_t[row] = r.mt + logf(r.zt);
  }
}

template <typename T>
__global__ void kl_backward_kernel(const T* s, const T* t, T* g, const float* __restrict lse_s,
                                   const float* __restrict lse_t, const float* __restrict row_scale, int64_t vocab,
                                   int64_t ss, int64_t ts, int64_t gs, float inv_t) {
  const int64_t row = blockIdx.x;  // rows on x (up to 2^31 - 1), tiles on y (up to 65535: vocab < 2.6e8)
  const float scale = row_scale[row], ls = lse_s[row], lt = lse_t[row];
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kBackwardThreads * kBackwardPerThread;
  const int64_t end = min(vocab, begin + static_cast<int64_t>(kBackwardThreads) * kBackwardPerThread);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBackwardThreads) {
    float x = static_cast<float>(s[row * ss + i]) * inv_t, y = static_cast<float>(t[row * ts + i]) * inv_t;
    float v = scale == 0.0f ? 0.0f : (__expf(x - ls) - __expf(y - lt)) * scale;
    g[row * gs + i] = T(v);  // g may be s itself: this element was read above
  }
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
void forward_launch(uintptr_t s, uintptr_t t, uintptr_t mask, uintptr_t loss, uintptr_t ls, uintptr_t lt,
                    int64_t rows, int64_t vocab, int64_t ss, int64_t ts, float inv_t, cudaStream_t stream) {
  kl_forward_kernel<T><<<static_cast<unsigned>(rows), kForwardThreads, 0, stream>>>(
      reinterpret_cast<const T*>(s), reinterpret_cast<const T*>(t), reinterpret_cast<const uint8_t*>(mask),
      reinterpret_cast<float*>(loss), reinterpret_cast<float*>(ls), reinterpret_cast<float*>(lt), vocab, ss, ts,
      inv_t);
}

template <typename T>
void backward_launch(uintptr_t s, uintptr_t t, uintptr_t g, uintptr_t ls, uintptr_t lt, uintptr_t scale,
                     int64_t rows, int64_t vocab, int64_t ss, int64_t ts, int64_t gs, float inv_t,
                     cudaStream_t stream) {
  const int64_t tile = static_cast<int64_t>(kBackwardThreads) * kBackwardPerThread;
  dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((vocab + tile - 1) / tile));
  kl_backward_kernel<T><<<grid, kBackwardThreads, 0, stream>>>(
      reinterpret_cast<const T*>(s), reinterpret_cast<const T*>(t), reinterpret_cast<T*>(g),
      reinterpret_cast<const float*>(ls), reinterpret_cast<const float*>(lt), reinterpret_cast<const float*>(scale),
      vocab, ss, ts, gs, inv_t);
}

}  // namespace

// dtype codes: 0 fp32, 1 bf16, 2 fp16 (forge/_native.py DTYPE_CODES)
void kl_div_forward_cuda(uintptr_t s, uintptr_t t, uintptr_t mask, uintptr_t loss, uintptr_t ls, uintptr_t lt,
                         int64_t rows, int64_t vocab, int64_t ss, int64_t ts, int dtype, float inv_t,
                         uintptr_t stream) {
  if (rows <= 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: forward_launch<float>(s, t, mask, loss, ls, lt, rows, vocab, ss, ts, inv_t, st); break;
    case 1: forward_launch<__nv_bfloat16>(s, t, mask, loss, ls, lt, rows, vocab, ss, ts, inv_t, st); break;
    case 2: forward_launch<__half>(s, t, mask, loss, ls, lt, rows, vocab, ss, ts, inv_t, st); break;
    default: throw std::invalid_argument("forge._cuda.kl_div_forward: bad dtype code");
  }
  check_launch("forge._cuda.kl_div_forward");
}

void kl_div_backward_cuda(uintptr_t s, uintptr_t t, uintptr_t ls, uintptr_t lt, uintptr_t scale, uintptr_t g,
                          int64_t rows, int64_t vocab, int64_t ss, int64_t ts, int64_t gs, int dtype, float inv_t,
                          uintptr_t stream) {
  if (rows <= 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: backward_launch<float>(s, t, g, ls, lt, scale, rows, vocab, ss, ts, gs, inv_t, st); break;
    case 1: backward_launch<__nv_bfloat16>(s, t, g, ls, lt, scale, rows, vocab, ss, ts, gs, inv_t, st); break;
    case 2: backward_launch<__half>(s, t, g, ls, lt, scale, rows, vocab, ss, ts, gs, inv_t, st); break;
    default: throw std::invalid_argument("forge._cuda.kl_div_backward: bad dtype code");
  }
  check_launch("forge._cuda.kl_div_backward");
}

}  // namespace forge
