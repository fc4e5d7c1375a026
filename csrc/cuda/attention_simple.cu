// Attention for float32 and float64 inputs on CUDA cores (the accuracy path; fp16/bf16 take the
// tensor-core kernels). Each warp owns 4 rows; lanes split the 32 keys (or queries) of a shared
// memory tile for dot products and the head dim (up to 5 x 32) for accumulation.
#include <cmath>

#include "attention.h"
#include "attention_tc.cuh"
#include "common.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kWarps = 4;
constexpr int kRows = kRowsPerWarp * kWarps;  // rows owned by a block
constexpr int kTile = 32;                     // keys (queries) per streamed tile
constexpr int kMaxPerLane = 5;                // 160 / 32

template <class A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// rows [row0, row0 + nrows) of a (rows, H, D) slab -> shared [nrows][pitch], zero past row_limit.
template <class T>
__device__ __forceinline__ void load_rows(T* dst, int pitch, const T* __restrict__ src, int64_t stride, int row0,
                                          int nrows, int row_limit, int D) {
  for (int i = threadIdx.x; i < nrows * D; i += blockDim.x) {
    const int r = i / D, d = i - r * D;
    dst[r * pitch + d] = row0 + r < row_limit ? src[static_cast<int64_t>(row0 + r) * stride + d] : T(0);
  }
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32, 1)
attn_simple_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const int32_t* __restrict__ key_lengths, T* __restrict__ out, T* __restrict__ lse, int N,
                       int L, int H, int D, T scale) {
  extern __shared__ __align__(16) unsigned char simple_smem[];
  T* sQ = reinterpret_cast<T*>(simple_smem);  // [kRows][D]
  T* sK = sQ + kRows * D;                     // [kTile][D + 1]
  T* sV = sK + kTile * (D + 1);               // [kTile][D]
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * N * H + h) * D, koff = (static_cast<int64_t>(b) * L * H + h) * D;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);

  load_rows(sQ, D, q + qoff, stride, m0, kRows, N, D);
  T m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = neg_inf<T>();
    l[r] = T(0);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) o[r][i] = T(0);
  }
  for (int k0 = 0; k0 < Lv; k0 += kTile) {
    __syncthreads();
    load_rows(sK, D + 1, k + koff, stride, k0, kTile, Lv, D);
    load_rows(sV, D, v + koff, stride, k0, kTile, Lv, D);
    __syncthreads();
    const bool valid = k0 + lane < Lv;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const T* qr = sQ + (warp * kRowsPerWarp + r) * D;
      T s = T(0);
      for (int d = 0; d < D; ++d) s += qr[d] * sK[lane * (D + 1) + d];
      s = valid ? s * scale : neg_inf<T>();
      const T mnew = max(m[r], warp_max(s));  // finite: the tile has a valid key
      const T alpha = fast_exp(m[r] - mnew);
      const T p = valid ? fast_exp(s - mnew) : T(0);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = mnew;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) o[r][i] *= alpha;
      for (int j = 0; j < kTile; ++j) {
        const T pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) o[r][i] += pj * sV[j * D + d];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = m0 + warp * kRowsPerWarp + r;
    if (row >= N) continue;
    const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) out[qoff + row * stride + d] = o[r][i] * inv;
    }
    if (lane == 0) lse[(static_cast<int64_t>(b) * H + h) * N + row] = l[r] > T(0) ? m[r] + log(l[r]) : neg_inf<T>();
  }
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32, 1)
attn_simple_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const T* __restrict__ lse, const T* __restrict__ delta,
                      const int32_t* __restrict__ key_lengths, T* __restrict__ dq, int N, int L, int H, int D,
                      T scale) {
  extern __shared__ __align__(16) unsigned char simple_smem[];
  T* sQ = reinterpret_cast<T*>(simple_smem);  // [kRows][D]
  T* sdO = sQ + kRows * D;                    // [kRows][D]
  T* sK = sdO + kRows * D;                    // [kTile][D + 1]
  T* sV = sK + kTile * (D + 1);               // [kTile][D + 1]
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * N * H + h) * D, koff = (static_cast<int64_t>(b) * L * H + h) * D;
  const int64_t roff = (static_cast<int64_t>(b) * H + h) * N;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);

  load_rows(sQ, D, q + qoff, stride, m0, kRows, N, D);
  load_rows(sdO, D, dout + qoff, stride, m0, kRows, N, D);
  T rl[kRowsPerWarp], rd[kRowsPerWarp], acc[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = m0 + warp * kRowsPerWarp + r;
    rl[r] = row < N ? lse[roff + row] : T(0);
    rd[r] = row < N ? delta[roff + row] : T(0);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[r][i] = T(0);
  }
  for (int k0 = 0; k0 < Lv; k0 += kTile) {
    __syncthreads();
    load_rows(sK, D + 1, k + koff, stride, k0, kTile, Lv, D);
    load_rows(sV, D + 1, v + koff, stride, k0, kTile, Lv, D);
    __syncthreads();
    const bool valid = k0 + lane < Lv;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const T* qr = sQ + (warp * kRowsPerWarp + r) * D;
      const T* gr = sdO + (warp * kRowsPerWarp + r) * D;
      T s = T(0), dp = T(0);
      for (int d = 0; d < D; ++d) {
        s += qr[d] * sK[lane * (D + 1) + d];
        dp += gr[d] * sV[lane * (D + 1) + d];
      }
      const T p = valid ? fast_exp(s * scale - rl[r]) : T(0);
      const T ds = p * (dp - rd[r]);
      for (int j = 0; j < kTile; ++j) {
        const T dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) acc[r][i] += dsj * sK[j * (D + 1) + d];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = m0 + warp * kRowsPerWarp + r;
    if (row >= N) continue;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dq[qoff + row * stride + d] = acc[r][i] * scale;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32, 1)
attn_simple_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const T* __restrict__ lse, const T* __restrict__ delta,
                        const int32_t* __restrict__ key_lengths, T* __restrict__ dk, T* __restrict__ dv, int N, int L,
                        int H, int D, T scale) {
  extern __shared__ __align__(16) unsigned char simple_smem[];
  T* sK = reinterpret_cast<T*>(simple_smem);  // [kRows][D]
  T* sV = sK + kRows * D;                     // [kRows][D]
  T* sQ = sV + kRows * D;                     // [kTile][D + 1]
  T* sdO = sQ + kTile * (D + 1);              // [kTile][D + 1]
  T* sL = sdO + kTile * (D + 1);              // [kTile]
  T* sD = sL + kTile;                         // [kTile]
  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * N * H + h) * D, koff = (static_cast<int64_t>(b) * L * H + h) * D;
  const int64_t roff = (static_cast<int64_t>(b) * H + h) * N;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);

  load_rows(sK, D, k + koff, stride, n0, kRows, Lv, D);
  load_rows(sV, D, v + koff, stride, n0, kRows, Lv, D);
  T adk[kRowsPerWarp][kMaxPerLane], adv[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) adk[r][i] = adv[r][i] = T(0);
  }
  const bool any_key = n0 < Lv;  // otherwise every gradient of the block is zero
  for (int q0 = 0; any_key && q0 < N; q0 += kTile) {
    __syncthreads();
    load_rows(sQ, D + 1, q + qoff, stride, q0, kTile, N, D);
    load_rows(sdO, D + 1, dout + qoff, stride, q0, kTile, N, D);
    if (threadIdx.x < kTile) {
      const int qi = q0 + threadIdx.x;
      sL[threadIdx.x] = qi < N ? lse[roff + qi] : T(0);
      sD[threadIdx.x] = qi < N ? delta[roff + qi] : T(0);
    }
    __syncthreads();
    const bool qvalid = q0 + lane < N;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int key = n0 + warp * kRowsPerWarp + r;
      const T* kr = sK + (warp * kRowsPerWarp + r) * D;
      const T* vr = sV + (warp * kRowsPerWarp + r) * D;
      T s = T(0), dp = T(0);
      for (int d = 0; d < D; ++d) {
        s += kr[d] * sQ[lane * (D + 1) + d];
        dp += vr[d] * sdO[lane * (D + 1) + d];
      }
      const T p = (qvalid && key < Lv) ? fast_exp(s * scale - sL[lane]) : T(0);
      const T ds = p * (dp - sD[lane]);
      for (int j = 0; j < kTile; ++j) {
        const T pj = __shfl_sync(0xffffffffu, p, j), dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) {
            adv[r][i] += pj * sdO[j * (D + 1) + d];
            adk[r][i] += dsj * sQ[j * (D + 1) + d];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int key = n0 + warp * kRowsPerWarp + r;
    if (key >= L) continue;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) {
        dk[koff + key * stride + d] = adk[r][i] * scale;
        dv[koff + key * stride + d] = adv[r][i];
      }
    }
  }
}

template <class T>
cudaError_t simple_fwd(const AttentionShape& s, const void* q, const void* k, const void* v, const int32_t* kl,
                       double scale, void* out, void* lse, cudaStream_t stream) {
  const int D = static_cast<int>(s.D);
  const size_t smem = static_cast<size_t>(kRows * D + kTile * (D + 1) + kTile * D) * sizeof(T);
  cudaError_t err = allow_smem(attn_simple_fwd_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(s.N, kRows)), static_cast<unsigned>(s.H),
                  static_cast<unsigned>(s.B));
  attn_simple_fwd_kernel<T><<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), kl, static_cast<T*>(out),
      static_cast<T*>(lse), static_cast<int>(s.N), static_cast<int>(s.L), static_cast<int>(s.H), D,
      static_cast<T>(scale));
  return cudaGetLastError();
}

template <class T>
cudaError_t simple_bwd(const AttentionShape& s, const void* dout, const void* q, const void* k, const void* v,
                       const void* lse, const void* delta, const int32_t* kl, double scale, void* dq, void* dk,
                       void* dv, cudaStream_t stream) {
  const int D = static_cast<int>(s.D), N = static_cast<int>(s.N), L = static_cast<int>(s.L);
  const int H = static_cast<int>(s.H);
  const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
  const T *tdo = static_cast<const T*>(dout), *tl = static_cast<const T*>(lse), *td = static_cast<const T*>(delta);
  const size_t smem_dq = static_cast<size_t>(2 * kRows * D + 2 * kTile * (D + 1)) * sizeof(T);
  const size_t smem_dkv = static_cast<size_t>(2 * kRows * D + 2 * kTile * (D + 1) + 2 * kTile) * sizeof(T);
  cudaError_t err = allow_smem(attn_simple_dq_kernel<T>, smem_dq);
  if (err == cudaSuccess) err = allow_smem(attn_simple_dkdv_kernel<T>, smem_dkv);
  if (err != cudaSuccess) return err;
  attn_simple_dq_kernel<T><<<dim3(static_cast<unsigned>(ceil_div(N, kRows)), H, static_cast<unsigned>(s.B)),
                             kWarps * 32, smem_dq, stream>>>(tq, tk, tv, tdo, tl, td, kl, static_cast<T*>(dq), N, L, H,
                                                             D, static_cast<T>(scale));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  attn_simple_dkdv_kernel<T><<<dim3(static_cast<unsigned>(ceil_div(L, kRows)), H, static_cast<unsigned>(s.B)),
                               kWarps * 32, smem_dkv, stream>>>(tq, tk, tv, tdo, tl, td, kl, static_cast<T*>(dk),
                                                                static_cast<T*>(dv), N, L, H, D,
                                                                static_cast<T>(scale));
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_simple_fwd(const AttentionShape& s, const void* q, const void* k, const void* v,
                                 const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream) {
  if (s.dtype == DType::kFloat64) return simple_fwd<double>(s, q, k, v, key_lengths, scale, out, lse, stream);
  if (s.dtype == DType::kFloat32) return simple_fwd<float>(s, q, k, v, key_lengths, scale, out, lse, stream);
  return cudaErrorInvalidValue;
}

cudaError_t attention_simple_bwd(const AttentionShape& s, const void* dout, const void* q, const void* k,
                                 const void* v, const void* lse, const void* delta, const int32_t* key_lengths,
                                 double scale, void* dq, void* dk, void* dv, cudaStream_t stream) {
  if (s.dtype == DType::kFloat64)
    return simple_bwd<double>(s, dout, q, k, v, lse, delta, key_lengths, scale, dq, dk, dv, stream);
  if (s.dtype == DType::kFloat32)
    return simple_bwd<float>(s, dout, q, k, v, lse, delta, key_lengths, scale, dq, dk, dv, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dalle3_fast
