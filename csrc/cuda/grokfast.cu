// Multi-tensor Grokfast filters for CUDA: one launch covers a whole list of tensors.
// The Python wrapper builds a small int64 table on the device (pointers, sizes, cumulative chunk
// counts); each block takes one chunk and finds its tensor by binary search in that table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace forge {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block: 64 per thread

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
template <typename T> __device__ __forceinline__ T cast_f(float x);
template <> __device__ __forceinline__ float cast_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 cast_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half cast_f<__half>(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float as_f(float x) { return x; }
__device__ __forceinline__ float as_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float as_f(__half x) { return __half2float(x); }

// Finds t with starts[t] <= chunk < starts[t+1].
__device__ __forceinline__ int find_tensor(const int64_t* starts, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// table rows (each n+1 long): 0 grads, 1 emas, 2 numels, 3 chunk starts
template <typename G, typename S>
__global__ void ema_kernel(const int64_t* __restrict table, int n, float alpha, float lamb) {
  const int64_t stride = n + 1;
  int64_t chunk = blockIdx.x;
  int t = find_tensor(table + 3 * stride, n, chunk);
  G* g = reinterpret_cast<G*>(table[t]);
  S* e = reinterpret_cast<S*>(table[stride + t]);
  int64_t numel = table[2 * stride + t];
  int64_t begin = (chunk - table[3 * stride + t]) * kChunk;
  int64_t end = min(begin + kChunk, numel);
  float beta = 1.0f - alpha;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float gi = load_f(g + i);
    S es = cast_f<S>(alpha * load_f(e + i) + beta * gi);
    e[i] = es;
    g[i] = cast_f<G>(gi + lamb * as_f(es));
  }
}

// table rows (each n+1 long): 0 grads, 1 rings, 2 sums, 3 numels, 4 chunk starts
template <typename G, typename R>
__global__ void ma_kernel(const int64_t* __restrict table, int n, int64_t slot, float scale, float lamb) {
  const int64_t stride = n + 1;
  int64_t chunk = blockIdx.x;
  int t = find_tensor(table + 4 * stride, n, chunk);
  G* g = reinterpret_cast<G*>(table[t]);
  int64_t numel = table[3 * stride + t];
  R* ring = reinterpret_cast<R*>(table[stride + t]) + slot * numel;
  float* sum = reinterpret_cast<float*>(table[2 * stride + t]);
  int64_t begin = (chunk - table[4 * stride + t]) * kChunk;
  int64_t end = min(begin + kChunk, numel);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float gi = load_f(g + i);
    R stored = cast_f<R>(gi);
    float s = sum[i] + (as_f(stored) - load_f(ring + i));
    ring[i] = stored;
    sum[i] = s;
    g[i] = cast_f<G>(gi + lamb * scale * s);
  }
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <template <typename, typename> class Launch, typename... Args>
void by_dtypes(int gd, int sd, Args... args) {
  // dtype codes: 0 fp32, 1 bf16, 2 fp16 (forge/_native.py DTYPE_CODES)
  switch (gd * 3 + sd) {
    case 0: Launch<float, float>::run(args...); break;
    case 1: Launch<float, __nv_bfloat16>::run(args...); break;
    case 2: Launch<float, __half>::run(args...); break;
    case 3: Launch<__nv_bfloat16, float>::run(args...); break;
    case 4: Launch<__nv_bfloat16, __nv_bfloat16>::run(args...); break;
    case 5: Launch<__nv_bfloat16, __half>::run(args...); break;
    case 6: Launch<__half, float>::run(args...); break;
    case 7: Launch<__half, __nv_bfloat16>::run(args...); break;
    case 8: Launch<__half, __half>::run(args...); break;
    default: throw std::invalid_argument("forge._cuda: bad dtype code");
  }
}

template <typename G, typename S> struct EmaLaunch {
  static void run(const int64_t* table, int n, int64_t chunks, float alpha, float lamb, cudaStream_t s) {
    ema_kernel<G, S><<<static_cast<unsigned>(chunks), kThreads, 0, s>>>(table, n, alpha, lamb);
  }
};
template <typename G, typename R> struct MaLaunch {
  static void run(const int64_t* table, int n, int64_t chunks, int64_t slot, float scale, float lamb,
                  cudaStream_t s) {
    ma_kernel<G, R><<<static_cast<unsigned>(chunks), kThreads, 0, s>>>(table, n, slot, scale, lamb);
  }
};

}  // namespace

int64_t grokfast_chunk_size() { return kChunk; }

void grokfast_ema_cuda(uintptr_t table, int n, int64_t chunks, int grad_dtype, int ema_dtype, float alpha,
                       float lamb, uintptr_t stream) {
  if (chunks <= 0) return;
  by_dtypes<EmaLaunch>(grad_dtype, ema_dtype, reinterpret_cast<const int64_t*>(table), n, chunks, alpha, lamb,
                       reinterpret_cast<cudaStream_t>(stream));
  check_launch("forge._cuda.grokfast_ema");
}

void grokfast_ma_cuda(uintptr_t table, int n, int64_t chunks, int grad_dtype, int ring_dtype, int64_t slot,
                      float scale, float lamb, uintptr_t stream) {
  if (chunks <= 0) return;
  by_dtypes<MaLaunch>(grad_dtype, ring_dtype, reinterpret_cast<const int64_t*>(table), n, chunks, slot, scale,
                      lamb, reinterpret_cast<cudaStream_t>(stream));
  check_launch("forge._cuda.grokfast_ma");
}

}  // namespace forge
