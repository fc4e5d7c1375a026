// Device helpers shared by the kernels: dtype traits, conversions, vectors, reductions.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace dalle3_fast {
namespace cuda {

// Accumulation type: float for every storage type but double.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

template <class A, class T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <class T, class A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <class T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Parameters of any floating dtype, read into the accumulation type.
template <class A>
__device__ __forceinline__ A load_param(ParamIn p, int64_t i, A absent) {
  if (p.ptr == nullptr) return absent;
  switch (p.dtype) {
    case DType::kFloat16:
      return static_cast<A>(__half2float(static_cast<const __half*>(p.ptr)[i]));
    case DType::kBFloat16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p.ptr)[i]));
    case DType::kFloat64:
      return static_cast<A>(static_cast<const double*>(p.ptr)[i]);
    default:
      return static_cast<A>(static_cast<const float*>(p.ptr)[i]);
  }
}

template <class A>
__device__ __forceinline__ void store_param(ParamOut p, int64_t i, A v) {
  if (p.ptr == nullptr) return;
  switch (p.dtype) {
    case DType::kFloat16:
      static_cast<__half*>(p.ptr)[i] = __float2half_rn(static_cast<float>(v));
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p.ptr)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    case DType::kFloat64:
      static_cast<double*>(p.ptr)[i] = static_cast<double>(v);
      break;
    default:
      static_cast<float*>(p.ptr)[i] = static_cast<float>(v);
  }
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Reciprocals without the IEEE slow-path subroutine, whose call costs a stack frame and spills.
// float: the hardware approximation (2 ulp; 0 for |x| > 2^126). double: float seed + two
// Newton steps (error 2^-23 -> 2^-46 -> below double rounding), 0 for |x| = inf.
__device__ __forceinline__ float recip(float x) { return __fdividef(1.0f, x); }
__device__ __forceinline__ double recip(double x) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(x)));
  r = r * fma(-x, r, 2.0);
  r = r * fma(-x, r, 2.0);
  return isinf(x) ? 0.0 : r;
}
__device__ __forceinline__ float rsqrt_(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_(double x) { return rsqrt(x); }

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024), same result in every thread.
// `scratch` holds 32 values; the call begins and ends with a barrier so it can be reused.
template <class A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < nwarps; ++w) total += scratch[w];
  return total;
}

inline int device_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 108;
  return sms;
}

inline int device_smem_optin() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 48 * 1024;
  return bytes;
}

// Lets `kernel` take `bytes` of dynamic shared memory (needed past 48 KB).
template <class K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat64:
      return 8;
    default:
      return 4;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace dalle3_fast
