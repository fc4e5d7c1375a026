// The dq and dk/dv kernels of the attention backward (the scheme is in attention_bwd.cu), and
// their launch; included by the instantiation files (instantiations/attention_bwd_hdim*_*.cu),
// one (T, D) each.
#pragma once

#include <cmath>

#include "attention.h"
#include "attention_tc.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace dalle3_fast {
namespace cuda {
namespace {

// ------------------------------------------------------------------ dq

template <class T, int D>
struct DqKernel {
  using Cfg = AttnCfg<D>;
  static constexpr int DP = Cfg::kDP, BM = Cfg::kBlock, BN = Cfg::kBN, NT = Cfg::kThreads;
  static constexpr int P = TileGeom<DP>::kPitch;
  static constexpr bool kFragsInRegs = DP <= 64;  // Q and dO fragments kept across key tiles
  static constexpr size_t kSmem = static_cast<size_t>(2 * BM + 4 * BN) * P * sizeof(T);
};

template <class T, int D>
__global__ void __launch_bounds__(AttnCfg<D>::kThreads, 1)
attn_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
               const int32_t* __restrict__ key_lengths, T* __restrict__ dq, int N, int L, int H, float scale_log2,
               float scale) {
  using K = DqKernel<T, D>;
  constexpr int DP = K::DP, BM = K::BM, BN = K::BN, NT = K::NT, P = K::P;
  extern __shared__ __align__(16) unsigned char attn_smem[];
  T* sQ = reinterpret_cast<T*>(attn_smem);
  T* sdO = sQ + BM * P;
  T* sK = sdO + BM * P;     // 2 stages
  T* sV = sK + 2 * BN * P;  // 2 stages

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * N * H + h) * D;
  const T* kb = k + (static_cast<int64_t>(b) * L * H + h) * D;
  const T* vb = v + (static_cast<int64_t>(b) * L * H + h) * D;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);
  const int nkt = (Lv + BN - 1) / BN;

  load_tile_async<T, BM, D, DP, NT>(sQ, q + qoff, stride, m0, N);
  load_tile_async<T, BM, D, DP, NT>(sdO, dout + qoff, stride, m0, N);
  if (nkt > 0) {
    load_tile_async<T, BN, D, DP, NT>(sK, kb, stride, 0, Lv);
    load_tile_async<T, BN, D, DP, NT>(sV, vb, stride, 0, Lv);
  }
  cp_async_commit();

  // Per-row constants of rows g and g + 8 (rows past N: finite values, results discarded).
  float lse2[2], dlt[2];
  {
    const int64_t rb = (static_cast<int64_t>(b) * H + h) * N;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = m0 + warp * 16 + g + 8 * hh;
      lse2[hh] = row < N ? lse[rb + row] * kLog2e : 0.f;
      dlt[hh] = row < N ? delta[rb + row] : 0.f;
    }
  }

  uint32_t qf[K::kFragsInRegs ? DP / 16 : 1][4], of[K::kFragsInRegs ? DP / 16 : 1][4];
  float acc[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int j = 0; j < nkt; ++j) {
    const int st = j & 1;
    if (j + 1 < nkt) {
      load_tile_async<T, BN, D, DP, NT>(sK + (st ^ 1) * BN * P, kb, stride, (j + 1) * BN, Lv);
      load_tile_async<T, BN, D, DP, NT>(sV + (st ^ 1) * BN * P, vb, stride, (j + 1) * BN, Lv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if constexpr (K::kFragsInRegs) {
      if (j == 0) {
#pragma unroll
        for (int ks = 0; ks < DP / 16; ++ks) {
          ldmatrix_x4(qf[ks], a_frag_addr<DP>(sQ, warp * 16, ks * 16, lane));
          ldmatrix_x4(of[ks], a_frag_addr<DP>(sdO, warp * 16, ks * 16, lane));
        }
      }
    }
    const T* cK = sK + st * BN * P;
    const T* cV = sV + st * BN * P;

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      uint32_t a[4], ao[4];
      if constexpr (K::kFragsInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = qf[ks][i];
          ao[i] = of[ks][i];
        }
      } else {
        ldmatrix_x4(a, a_frag_addr<DP>(sQ, warp * 16, ks * 16, lane));
        ldmatrix_x4(ao, a_frag_addr<DP>(sdO, warp * 16, ks * 16, lane));
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, b_frag_addr<DP>(cK, np * 16, ks * 16, lane));
        mma_16816<T>(s[2 * np], a, r[0], r[1]);
        mma_16816<T>(s[2 * np + 1], a, r[2], r[3]);
        ldmatrix_x4(r, b_frag_addr<DP>(cV, np * 16, ks * 16, lane));
        mma_16816<T>(dp[2 * np], ao, r[0], r[1]);
        mma_16816<T>(dp[2 * np + 1], ao, r[2], r[3]);
      }
    }
    const int key0 = j * BN;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = key0 + nt * 8 + 2 * t + (e & 1) < Lv;
        const float p = valid ? exp2f(s[nt][e] * scale_log2 - lse2[e >> 1]) : 0.f;
        dp[nt][e] = p * (dp[nt][e] - dlt[e >> 1]);  // dS
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T>(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < DP / 16; ++dt) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, bt_frag_addr<DP>(cK, kk * 16, dt * 16, lane));
        mma_16816<T>(acc[2 * dt], a, r[0], r[1]);
        mma_16816<T>(acc[2 * dt + 1], a, r[2], r[3]);
      }
    }
    __syncthreads();
  }

  cp_async_wait<0>();
  __syncthreads();
  acc_rows_to_smem<T, DP>(sQ, warp * 16, acc, scale, scale, lane);
  __syncwarp();
  smem_rows_to_global<T, D, DP>(dq + qoff, stride, sQ, warp * 16, m0 + warp * 16, N, lane);
}

// ------------------------------------------------------------------ dk, dv

template <class T, int D>
struct DkvKernel {
  using Cfg = AttnCfg<D>;
  static constexpr int DP = Cfg::kDP, BN = Cfg::kBlock, BQ = Cfg::kBQ, NT = Cfg::kThreads;
  static constexpr int P = TileGeom<DP>::kPitch;
  static constexpr bool kFragsInRegs = DP <= 64;  // K and V fragments kept across query tiles
  static constexpr size_t kTiles = static_cast<size_t>(2 * BN + 4 * BQ) * P * sizeof(T);
  static constexpr size_t kSmem = kTiles + 4 * BQ * sizeof(float);
};

template <class T, int D>
__global__ void __launch_bounds__(AttnCfg<D>::kThreads, 1)
attn_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                 const int32_t* __restrict__ key_lengths, T* __restrict__ dk, T* __restrict__ dv, int N, int L, int H,
                 float scale_log2, float scale) {
  using K = DkvKernel<T, D>;
  constexpr int DP = K::DP, BN = K::BN, BQ = K::BQ, NT = K::NT, P = K::P;
  extern __shared__ __align__(16) unsigned char attn_smem[];
  T* sK = reinterpret_cast<T*>(attn_smem);
  T* sV = sK + BN * P;
  T* sQ = sV + BN * P;       // 2 stages of BQ rows
  T* sdO = sQ + 2 * BQ * P;  // 2 stages of BQ rows
  float* sL = reinterpret_cast<float*>(attn_smem + K::kTiles);  // 2 stages: lse * log2(e), +inf past N
  float* sD = sL + 2 * BQ;                                        // 2 stages: delta, 0 past N

  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const int64_t koff = (static_cast<int64_t>(b) * L * H + h) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * N * H + h) * D;
  const int64_t roff = (static_cast<int64_t>(b) * H + h) * N;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);

  if (n0 >= Lv) {  // no valid key in this tile: the gradients are zero
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int i = threadIdx.x; i < BN * (D / 8); i += NT) {
      const int r = i / (D / 8), c = i % (D / 8);
      if (n0 + r < L) {
        *reinterpret_cast<uint4*>(dk + koff + static_cast<int64_t>(n0 + r) * stride + c * 8) = zero;
        *reinterpret_cast<uint4*>(dv + koff + static_cast<int64_t>(n0 + r) * stride + c * 8) = zero;
      }
    }
    return;
  }
  const int nqt = (N + BQ - 1) / BQ;

  load_tile_async<T, BN, D, DP, NT>(sK, k + koff, stride, n0, Lv);
  load_tile_async<T, BN, D, DP, NT>(sV, v + koff, stride, n0, Lv);
  load_tile_async<T, BQ, D, DP, NT>(sQ, q + qoff, stride, 0, N);
  load_tile_async<T, BQ, D, DP, NT>(sdO, dout + qoff, stride, 0, N);
  cp_async_commit();
  for (int i = threadIdx.x; i < BQ; i += NT) {
    sL[i] = i < N ? lse[roff + i] * kLog2e : INFINITY;
    sD[i] = i < N ? delta[roff + i] : 0.f;
  }

  uint32_t kf[K::kFragsInRegs ? DP / 16 : 1][4], vf[K::kFragsInRegs ? DP / 16 : 1][4];
  float adk[DP / 8][4], adv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    adk[i][0] = adk[i][1] = adk[i][2] = adk[i][3] = 0.f;
    adv[i][0] = adv[i][1] = adv[i][2] = adv[i][3] = 0.f;
  }
  // Rows of this thread: keys n0 + warp*16 + g (+8); keys past Lv get P = 0.
  const bool key_ok[2] = {n0 + warp * 16 + g < Lv, n0 + warp * 16 + g + 8 < Lv};

  for (int i = 0; i < nqt; ++i) {
    const int st = i & 1;
    if (i + 1 < nqt) {
      const int q0 = (i + 1) * BQ;
      load_tile_async<T, BQ, D, DP, NT>(sQ + (st ^ 1) * BQ * P, q + qoff, stride, q0, N);
      load_tile_async<T, BQ, D, DP, NT>(sdO + (st ^ 1) * BQ * P, dout + qoff, stride, q0, N);
      for (int r = threadIdx.x; r < BQ; r += NT) {
        sL[(st ^ 1) * BQ + r] = q0 + r < N ? lse[roff + q0 + r] * kLog2e : INFINITY;
        sD[(st ^ 1) * BQ + r] = q0 + r < N ? delta[roff + q0 + r] : 0.f;
      }
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if constexpr (K::kFragsInRegs) {
      if (i == 0) {
#pragma unroll
        for (int ks = 0; ks < DP / 16; ++ks) {
          ldmatrix_x4(kf[ks], a_frag_addr<DP>(sK, warp * 16, ks * 16, lane));
          ldmatrix_x4(vf[ks], a_frag_addr<DP>(sV, warp * 16, ks * 16, lane));
        }
      }
    }
    const T* cQ = sQ + st * BQ * P;
    const T* cdO = sdO + st * BQ * P;
    const float* cL = sL + st * BQ;
    const float* cD = sD + st * BQ;

    float s[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      uint32_t a[4], av[4];
      if constexpr (K::kFragsInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          a[e] = kf[ks][e];
          av[e] = vf[ks][e];
        }
      } else {
        ldmatrix_x4(a, a_frag_addr<DP>(sK, warp * 16, ks * 16, lane));
        ldmatrix_x4(av, a_frag_addr<DP>(sV, warp * 16, ks * 16, lane));
      }
#pragma unroll
      for (int np = 0; np < BQ / 16; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, b_frag_addr<DP>(cQ, np * 16, ks * 16, lane));
        mma_16816<T>(s[2 * np], a, r[0], r[1]);
        mma_16816<T>(s[2 * np + 1], a, r[2], r[3]);
        ldmatrix_x4(r, b_frag_addr<DP>(cdO, np * 16, ks * 16, lane));
        mma_16816<T>(dp[2 * np], av, r[0], r[1]);
        mma_16816<T>(dp[2 * np + 1], av, r[2], r[3]);
      }
    }
    // P^T and dS^T: rows are keys (g, g+8), columns are queries.
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * t + (e & 1);
        const float p = key_ok[e >> 1] ? exp2f(s[n][e] * scale_log2 - cL[col]) : 0.f;
        s[n][e] = p;
        dp[n][e] = p * (dp[n][e] - cD[col]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t a[4], ad[4];
      acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
      acc_to_a<T>(ad, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < DP / 16; ++dt) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, bt_frag_addr<DP>(cdO, kk * 16, dt * 16, lane));
        mma_16816<T>(adv[2 * dt], a, r[0], r[1]);
        mma_16816<T>(adv[2 * dt + 1], a, r[2], r[3]);
        ldmatrix_x4_trans(r, bt_frag_addr<DP>(cQ, kk * 16, dt * 16, lane));
        mma_16816<T>(adk[2 * dt], ad, r[0], r[1]);
        mma_16816<T>(adk[2 * dt + 1], ad, r[2], r[3]);
      }
    }
    __syncthreads();
  }

  cp_async_wait<0>();
  __syncthreads();
  acc_rows_to_smem<T, DP>(sK, warp * 16, adk, scale, scale, lane);
  acc_rows_to_smem<T, DP>(sV, warp * 16, adv, 1.f, 1.f, lane);
  __syncwarp();
  smem_rows_to_global<T, D, DP>(dk + koff, stride, sK, warp * 16, n0 + warp * 16, L, lane);
  smem_rows_to_global<T, D, DP>(dv + koff, stride, sV, warp * 16, n0 + warp * 16, L, lane);
}

// ------------------------------------------------------------------ launch
}  // namespace

template <class T, int D>
cudaError_t attention_bwd_tc(const AttentionShape& s, const void* dout, const void* q, const void* k, const void* v,
                             const float* lse, const float* delta, const int32_t* kl, double scale, void* dq,
                             void* dk, void* dv, cudaStream_t stream) {
  const int N = static_cast<int>(s.N), L = static_cast<int>(s.L), H = static_cast<int>(s.H);
  const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
  const T* tdo = static_cast<const T*>(dout);
  cudaError_t err;
  {
    using K = DqKernel<T, D>;
    auto kernel = attn_dq_kernel<T, D>;
    if ((err = allow_smem(kernel, K::kSmem)) != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(s.N, K::BM)), H, static_cast<unsigned>(s.B));
    kernel<<<grid, K::NT, K::kSmem, stream>>>(tq, tk, tv, tdo, lse, delta, kl, static_cast<T*>(dq), N, L, H,
                                              static_cast<float>(scale * kLog2e), static_cast<float>(scale));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  {
    using K = DkvKernel<T, D>;
    auto kernel = attn_dkdv_kernel<T, D>;
    if ((err = allow_smem(kernel, K::kSmem)) != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(s.L, K::BN)), H, static_cast<unsigned>(s.B));
    kernel<<<grid, K::NT, K::kSmem, stream>>>(tq, tk, tv, tdo, lse, delta, kl, static_cast<T*>(dk),
                                              static_cast<T*>(dv), N, L, H, static_cast<float>(scale * kLog2e),
                                              static_cast<float>(scale));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dalle3_fast
