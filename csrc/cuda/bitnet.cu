// BitNet b1.58 kernels for CUDA (Ma et al. 2024, arXiv 2402.17764): absmean ternary quantization,
// per-token absmax int8 activations, and the packed-ternary GEMV/GEMM-at-small-batch for inference.
// Raw device pointers and a stream from the Python wrapper (forge/ops/bitnet.py), which allocates every
// buffer (scales, partial sums, the int8 activations) with torch. Divisions use __fdiv_rn so that the
// module's --use_fast_math cannot move a value across a rounding boundary: results match the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace forge {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockValues = 4096;  // values a block for the per-tensor passes: 16 a thread
constexpr int kRowsPerBlock = kThreads / 32;  // ternary_linear: one warp an output row

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// round half to even (torch.round), then clamp; NaN becomes lo (its scale carries the NaN).
__device__ __forceinline__ float round_clip(float v, float lo, float hi) {
  v = rintf(v);
  v = v >= lo ? v : lo;
  return v <= hi ? v : hi;
}

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Block-wide reduction over kThreads threads; every thread gets the result.
template <typename Op>
__device__ float block_reduce(float v, Op op) {
  __shared__ float warp_vals[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) warp_vals[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = warp_vals[0];
  for (int w = 1; w < kThreads / 32; ++w) r = op(r, warp_vals[w]);
  __syncthreads();
  return r;
}

template <typename T>
__global__ void abs_partial_kernel(const T* __restrict w, int64_t group_size, int64_t per_group, float* partial) {
  int64_t g = blockIdx.x / per_group, begin = (blockIdx.x % per_group) * kBlockValues;
  int64_t end = min(begin + kBlockValues, group_size);
  const T* base = w + g * group_size;
  float s = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) s += fabsf(to_f(base[i]));
  s = block_reduce(s, [](float a, float b) { return a + b; });
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// scale_g = max(sum of the group's partials (in double) / group_size, eps); one block a group.
__global__ void group_scale_kernel(const float* __restrict partial, int64_t per_group, int64_t group_size, float eps,
                                   float* scale) {
  __shared__ double sums[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < per_group; i += kThreads) s += partial[blockIdx.x * per_group + i];
  sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int t = 0; t < kThreads; ++t) total += sums[t];
    float mean = static_cast<float>(total / static_cast<double>(group_size));
    scale[blockIdx.x] = mean < eps ? eps : mean;
  }
}

template <typename T, bool Dequantize>
__global__ void ternary_apply_kernel(const T* __restrict w, int64_t group_size, int64_t per_group,
                                     const float* __restrict scale, void* out) {
  int64_t g = blockIdx.x / per_group, begin = (blockIdx.x % per_group) * kBlockValues;
  int64_t end = min(begin + kBlockValues, group_size), base = g * group_size;
  float s = scale[g];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float q = round_clip(__fdiv_rn(to_f(w[base + i]), s), -1.0f, 1.0f);
    if (Dequantize) static_cast<T*>(out)[base + i] = from_f<T>(q * s);
    else static_cast<int8_t*>(out)[base + i] = static_cast<int8_t>(q);
  }
}

template <typename T, bool Dequantize>
__global__ void act_quant_kernel(const T* __restrict x, int64_t cols, float eps, float* scale, void* out,
                                 int64_t out_stride) {
  const T* row = x + blockIdx.x * cols;
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += kThreads) m = nan_max(m, fabsf(to_f(row[i])));
  m = block_reduce(m, nan_max);
  float s = __fdiv_rn(m < eps ? eps : m, 127.0f);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
    float q = round_clip(__fdiv_rn(to_f(row[i]), s), -127.0f, 127.0f);
    if (Dequantize) static_cast<T*>(out)[blockIdx.x * out_stride + i] = from_f<T>(q * s);
    else static_cast<int8_t*>(out)[blockIdx.x * out_stride + i] = static_cast<int8_t>(q);
  }
}

// y[r, row] = (sum_k w[row, k] * xq[r, k]) * xs[r] * ws[row]; w decoded from 2-bit codes (planar layout:
// weight i * kb + j in byte j, bits 2i). One warp an output row; blockIdx.y is the token r.
template <typename T>
__global__ void ternary_linear_kernel(const int8_t* __restrict xq, const float* __restrict xs, int64_t kb,
                                      const uint8_t* __restrict packed, int64_t n, const float* __restrict ws,
                                      int64_t ws_stride, T* __restrict y) {
  int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  int64_t r = blockIdx.y;
  const uint8_t* p = packed + row * kb;
  const int8_t* x = xq + r * 4 * kb;
  int acc = 0;
  for (int64_t j = threadIdx.x & 31; j < kb; j += 32) {
    int b = p[j];
    acc += ((b & 3) - 1) * x[j] + (((b >> 2) & 3) - 1) * x[kb + j] + (((b >> 4) & 3) - 1) * x[2 * kb + j] +
           ((b >> 6) - 1) * x[3 * kb + j];
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) y[r * n + row] = from_f<T>((static_cast<float>(acc) * xs[r]) * ws[row * ws_stride]);
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
void ternary_typed(uintptr_t w, int64_t groups, int64_t group_size, float eps, uintptr_t scale, uintptr_t partial,
                   uintptr_t out, bool dequantize, cudaStream_t s) {
  int64_t per_group = (group_size + kBlockValues - 1) / kBlockValues;
  unsigned blocks = static_cast<unsigned>(groups * per_group);
  const T* wp = reinterpret_cast<const T*>(w);
  float* pp = reinterpret_cast<float*>(partial);
  float* sp = reinterpret_cast<float*>(scale);
  abs_partial_kernel<T><<<blocks, kThreads, 0, s>>>(wp, group_size, per_group, pp);
  group_scale_kernel<<<static_cast<unsigned>(groups), kThreads, 0, s>>>(pp, per_group, group_size, eps, sp);
  if (dequantize) ternary_apply_kernel<T, true><<<blocks, kThreads, 0, s>>>(wp, group_size, per_group, sp, reinterpret_cast<void*>(out));
  else ternary_apply_kernel<T, false><<<blocks, kThreads, 0, s>>>(wp, group_size, per_group, sp, reinterpret_cast<void*>(out));
}

template <typename T>
void act_typed(uintptr_t x, int64_t rows, int64_t cols, float eps, uintptr_t scale, uintptr_t out, int64_t out_stride,
               bool dequantize, cudaStream_t s) {
  const T* xp = reinterpret_cast<const T*>(x);
  float* sp = reinterpret_cast<float*>(scale);
  void* op = reinterpret_cast<void*>(out);
  unsigned grid = static_cast<unsigned>(rows);
  if (dequantize) act_quant_kernel<T, true><<<grid, kThreads, 0, s>>>(xp, cols, eps, sp, op, out_stride);
  else act_quant_kernel<T, false><<<grid, kThreads, 0, s>>>(xp, cols, eps, sp, op, out_stride);
}

}  // namespace

// dtype codes: 0 fp32, 1 bf16, 2 fp16 (forge/_native.py DTYPE_CODES). partial: float32[groups * ceil(group_size / 4096)].
void ternary_quant_cuda(uintptr_t w, int dtype, int64_t groups, int64_t group_size, float eps, uintptr_t scale,
                        uintptr_t partial, uintptr_t out, bool dequantize, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0) ternary_typed<float>(w, groups, group_size, eps, scale, partial, out, dequantize, s);
  else if (dtype == 1) ternary_typed<__nv_bfloat16>(w, groups, group_size, eps, scale, partial, out, dequantize, s);
  else if (dtype == 2) ternary_typed<__half>(w, groups, group_size, eps, scale, partial, out, dequantize, s);
  else throw std::invalid_argument("forge._cuda: bad dtype code");
  check_launch("forge._cuda.ternary_quant");
}

int64_t ternary_block_values() { return kBlockValues; }

void act_quant_cuda(uintptr_t x, int dtype, int64_t rows, int64_t cols, float eps, uintptr_t scale, uintptr_t out,
                    int64_t out_stride, bool dequantize, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0) act_typed<float>(x, rows, cols, eps, scale, out, out_stride, dequantize, s);
  else if (dtype == 1) act_typed<__nv_bfloat16>(x, rows, cols, eps, scale, out, out_stride, dequantize, s);
  else if (dtype == 2) act_typed<__half>(x, rows, cols, eps, scale, out, out_stride, dequantize, s);
  else throw std::invalid_argument("forge._cuda: bad dtype code");
  check_launch("forge._cuda.act_quant");
}

// xq: int8 (m, 4 * kb) from act_quant (zero padded), xs: float32 (m,); y: (m, n) in dtype.
void ternary_linear_cuda(uintptr_t xq, uintptr_t xs, int64_t m, int64_t kb, uintptr_t packed, int64_t n,
                         uintptr_t scale, int64_t scale_stride, int dtype, uintptr_t y, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(m));
  auto* xp = reinterpret_cast<const int8_t*>(xq);
  auto* sp = reinterpret_cast<const float*>(xs);
  auto* pp = reinterpret_cast<const uint8_t*>(packed);
  auto* wp = reinterpret_cast<const float*>(scale);
  if (dtype == 0) ternary_linear_kernel<float><<<grid, kThreads, 0, s>>>(xp, sp, kb, pp, n, wp, scale_stride, reinterpret_cast<float*>(y));
  else if (dtype == 1) ternary_linear_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(xp, sp, kb, pp, n, wp, scale_stride, reinterpret_cast<__nv_bfloat16*>(y));
  else if (dtype == 2) ternary_linear_kernel<__half><<<grid, kThreads, 0, s>>>(xp, sp, kb, pp, n, wp, scale_stride, reinterpret_cast<__half*>(y));
  else throw std::invalid_argument("forge._cuda: bad dtype code");
  check_launch("forge._cuda.ternary_linear");
}

}  // namespace forge
