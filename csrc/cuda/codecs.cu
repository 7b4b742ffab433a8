// SeedLM and VQ kernels for CUDA (formulas and layouts: forge/ops/seedlm.py, forge/ops/vq.py).
// Raw device pointers and a stream handle; float32 weights and activations.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace forge {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxC = 32, kMaxP = 8, kMaxV = 64;

void check(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// One thread a block: every candidate seed from the (seeds, P, C) tables U^T and U^+ (built once per
// (K, C, P) on the device; no blocks x seeds tensor), quantized coefficients, error, running minimum.
__global__ void seedlm_search_kernel(const float* __restrict w, int64_t n, int C, int P,
                                     const float* __restrict ut, const float* __restrict pinv, int64_t num_seeds,
                                     int32_t* best, int8_t* q_out, int8_t* e_out, float* err_out) {
  int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  float x[kMaxC], bq[kMaxP] = {}, t[kMaxP];
  for (int c = 0; c < C; ++c) x[c] = w[b * C + c];
  float be = INFINITY;
  int bs = 0, bexp = -8;
  for (int64_t s = 0; s < num_seeds; ++s) {
    const float* pi = pinv + s * P * C;
    const float* u = ut + s * P * C;
    float amax = 0.0f;
    for (int p = 0; p < P; ++p) {
      float acc = 0.0f;
      for (int c = 0; c < C; ++c) acc = fmaf(pi[p * C + c], x[c], acc);
      t[p] = acc;
      amax = fmaxf(amax, fabsf(acc));
    }
    int bits = __float_as_int(amax);
    int e = ((bits >> 23) & 0xFF) - 129 + ((bits & 0x7FFFFF) > 0x700000);
    e = min(max(e, -8), 7);
    float err = 0.0f;
    for (int p = 0; p < P; ++p) t[p] = rintf(fminf(fmaxf(t[p] * pow2(-e), -8.0f), 7.0f));
    for (int c = 0; c < C; ++c) {
      float r = x[c];
      for (int p = 0; p < P; ++p) r -= u[p * C + c] * (t[p] * pow2(e));
      err = fmaf(r, r, err);
    }
    if (err < be) {
      be = err;
      bs = static_cast<int>(s);
      bexp = e;
      for (int p = 0; p < P; ++p) bq[p] = t[p];
    }
  }
  best[b] = bs;
  e_out[b] = static_cast<int8_t>(bexp);
  err_out[b] = be;
  for (int p = 0; p < P; ++p) q_out[b * P + p] = static_cast<int8_t>(bq[p]);
}

__device__ __forceinline__ float seedlm_weight(const float* walk, const int32_t* pos, const int32_t* seeds,
                                               const int8_t* q, const int8_t* e, int64_t f, int C, int P) {
  int64_t blk = f / C;
  int row = static_cast<int>(f % C);
  const float* u = walk + pos[seeds[blk]] + 1 + row * P;
  float scale = pow2(e[blk]), acc = 0.0f;
  for (int p = 0; p < P; ++p) acc = fmaf(u[p], static_cast<float>(q[blk * P + p]) * scale, acc);
  return acc;
}

__global__ void seedlm_decode_kernel(const float* walk, const int32_t* pos, const int32_t* seeds, const int8_t* q,
                                     const int8_t* e, int64_t total, int C, int P, float* out) {
  int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f < total) out[f] = seedlm_weight(walk, pos, seeds, q, e, f, C, P);
}

// One warp an output row (blockIdx.y: the activation row); weights decoded inside the dot product.
__global__ void seedlm_linear_kernel(const float* __restrict x, int64_t k, int64_t n_out, const float* walk,
                                     const int32_t* pos, const int32_t* seeds, const int8_t* q, const int8_t* e,
                                     int C, int P, float* y) {
  int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= n_out) return;
  int64_t i = blockIdx.y;
  float acc = 0.0f;
  for (int64_t j = threadIdx.x & 31; j < k; j += 32)
    acc = fmaf(x[i * k + j], seedlm_weight(walk, pos, seeds, q, e, row * k + j, C, P), acc);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) y[i * n_out + row] = acc;
}

__device__ __forceinline__ float vq_value(const int32_t* idx, const float* book, const int32_t* res,
                                          const float* res_book, int64_t at, int v, int r) {
  float val = book[static_cast<int64_t>(idx[at]) * v + r];
  if (res) val += res_book[static_cast<int64_t>(res[at]) * v + r];
  return val;
}

__global__ void vq_decode_kernel(const int32_t* idx, const float* book, const int32_t* res, const float* res_book,
                                 const float* scale, int64_t n_out, int64_t n_in, int v, float* w) {
  int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= n_out * n_in) return;
  int64_t row = f / n_in, j = f % n_in;
  w[f] = scale[j] * vq_value(idx, book, res, res_book, (row / v) * n_in + j, v, static_cast<int>(row % v));
}

// One warp an output row: lanes split the input columns; the codeword value of row r is one gather.
__global__ void vq_linear_kernel(const float* __restrict x, const int32_t* idx, const float* book, const int32_t* res,
                                 const float* res_book, const float* scale, int64_t n_out, int64_t n_in, int v,
                                 float* y) {
  int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= n_out) return;
  int64_t i = blockIdx.y, g = row / v;
  int r = static_cast<int>(row % v);
  float acc = 0.0f;
  for (int64_t j = threadIdx.x & 31; j < n_in; j += 32)
    acc = fmaf(x[i * n_in + j] * scale[j], vq_value(idx, book, res, res_book, g * n_in + j, v, r), acc);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) y[i * n_out + row] = acc;
}

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
unsigned blocks_for(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

void seedlm_search_cuda(uintptr_t w, int64_t n, int C, int P, uintptr_t ut, uintptr_t pinv, int64_t num_seeds,
                        uintptr_t best, uintptr_t q, uintptr_t e, uintptr_t err, uintptr_t stream) {
  if (C > kMaxC || P > kMaxP) throw std::invalid_argument("seedlm_search_cuda: C <= 32 and P <= 8");
  seedlm_search_kernel<<<blocks_for(n, 128), 128, 0, stream_of(stream)>>>(
      ptr<const float>(w), n, C, P, ptr<const float>(ut), ptr<const float>(pinv), num_seeds, ptr<int32_t>(best),
      ptr<int8_t>(q), ptr<int8_t>(e), ptr<float>(err));
  check("seedlm_search_kernel");
}

void seedlm_decode_cuda(uintptr_t walk, uintptr_t pos, uintptr_t seeds, uintptr_t q, uintptr_t e, int64_t n, int C,
                        int P, uintptr_t out, uintptr_t stream) {
  seedlm_decode_kernel<<<blocks_for(n * C, kThreads), kThreads, 0, stream_of(stream)>>>(
      ptr<const float>(walk), ptr<const int32_t>(pos), ptr<const int32_t>(seeds), ptr<const int8_t>(q),
      ptr<const int8_t>(e), n * C, C, P, ptr<float>(out));
  check("seedlm_decode_kernel");
}

void seedlm_linear_cuda(uintptr_t x, int64_t m, int64_t k, int64_t n_out, uintptr_t walk, uintptr_t pos,
                        uintptr_t seeds, uintptr_t q, uintptr_t e, int C, int P, uintptr_t y, uintptr_t stream) {
  dim3 grid(blocks_for(n_out, kThreads / 32), static_cast<unsigned>(m));
  seedlm_linear_kernel<<<grid, kThreads, 0, stream_of(stream)>>>(
      ptr<const float>(x), k, n_out, ptr<const float>(walk), ptr<const int32_t>(pos), ptr<const int32_t>(seeds),
      ptr<const int8_t>(q), ptr<const int8_t>(e), C, P, ptr<float>(y));
  check("seedlm_linear_kernel");
}

void vq_decode_cuda(uintptr_t idx, uintptr_t book, uintptr_t res, uintptr_t res_book, uintptr_t scale, int64_t n_out,
                    int64_t n_in, int v, uintptr_t w, uintptr_t stream) {
  vq_decode_kernel<<<blocks_for(n_out * n_in, kThreads), kThreads, 0, stream_of(stream)>>>(
      ptr<const int32_t>(idx), ptr<const float>(book), ptr<const int32_t>(res), ptr<const float>(res_book),
      ptr<const float>(scale), n_out, n_in, v, ptr<float>(w));
  check("vq_decode_kernel");
}

void vq_linear_cuda(uintptr_t x, int64_t m, uintptr_t idx, uintptr_t book, uintptr_t res, uintptr_t res_book,
                    uintptr_t scale, int64_t n_out, int64_t n_in, int v, uintptr_t y, uintptr_t stream) {
  if (v > kMaxV) throw std::invalid_argument("vq_linear_cuda: v <= 64");
  dim3 grid(blocks_for(n_out, kThreads / 32), static_cast<unsigned>(m));
  vq_linear_kernel<<<grid, kThreads, 0, stream_of(stream)>>>(
      ptr<const float>(x), ptr<const int32_t>(idx), ptr<const float>(book), ptr<const int32_t>(res),
      ptr<const float>(res_book), ptr<const float>(scale), n_out, n_in, v, ptr<float>(y));
  check("vq_linear_kernel");
}

}  // namespace forge
