// Attention forward, flash-attention-2 style: a CTA holds 64 queries of one (batch, head),
// streams 64-key tiles of K and V through double-buffered shared memory (cp.async), computes
// S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation) and keeps the softmax
// online (running max and sum per row, in the log2 domain).
// Included by the instantiation files (instantiations/attention_fwd_hdim*_*.cu), one (T, D) each.
#pragma once

#include <cmath>

#include "attention.h"
#include "attention_tc.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace dalle3_fast {
namespace cuda {
namespace {

template <class T, int D>
struct FwdKernel {
  using Cfg = AttnCfg<D>;
  static constexpr int DP = Cfg::kDP, BM = Cfg::kBlock, BN = Cfg::kBN, NT = Cfg::kThreads;
  static constexpr int P = TileGeom<DP>::kPitch;
  static constexpr size_t kSmem = static_cast<size_t>(BM + 4 * BN) * P * sizeof(T);
};

template <class T, int D>
__global__ void __launch_bounds__(AttnCfg<D>::kThreads, 1)
attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const int32_t* __restrict__ key_lengths, T* __restrict__ out, float* __restrict__ lse, int N, int L,
                int H, float scale_log2) {
  using K = FwdKernel<T, D>;
  constexpr int DP = K::DP, BM = K::BM, BN = K::BN, NT = K::NT, P = K::P;
  extern __shared__ __align__(16) unsigned char attn_smem[];
  T* sQ = reinterpret_cast<T*>(attn_smem);
  T* sK = sQ + BM * P;      // 2 stages of BN rows
  T* sV = sK + 2 * BN * P;  // 2 stages of BN rows

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t stride = static_cast<int64_t>(H) * D;
  const T* qb = q + (static_cast<int64_t>(b) * N * H + h) * D;
  const T* kb = k + (static_cast<int64_t>(b) * L * H + h) * D;
  const T* vb = v + (static_cast<int64_t>(b) * L * H + h) * D;
  const int Lv = key_lengths == nullptr ? L : min(max(key_lengths[b], 0), L);
  const int nkt = (Lv + BN - 1) / BN;

  load_tile_async<T, BM, D, DP, NT>(sQ, qb, stride, m0, N);
  if (nkt > 0) {
    load_tile_async<T, BN, D, DP, NT>(sK, kb, stride, 0, Lv);
    load_tile_async<T, BN, D, DP, NT>(sV, vb, stride, 0, Lv);
  }
  cp_async_commit();

  uint32_t qf[DP / 16][4];
  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int j = 0; j < nkt; ++j) {
    const int st = j & 1;
    if (j + 1 < nkt) {
      load_tile_async<T, BN, D, DP, NT>(sK + (st ^ 1) * BN * P, kb, stride, (j + 1) * BN, Lv);
      load_tile_async<T, BN, D, DP, NT>(sV + (st ^ 1) * BN * P, vb, stride, (j + 1) * BN, Lv);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued: Q and tile j
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) ldmatrix_x4(qf[ks], a_frag_addr<DP>(sQ, warp * 16, ks * 16, lane));
    }
    const T* cK = sK + st * BN * P;
    const T* cV = sV + st * BN * P;

    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, b_frag_addr<DP>(cK, np * 16, ks * 16, lane));
        mma_16816<T>(s[2 * np], qf[ks], r[0], r[1]);
        mma_16816<T>(s[2 * np + 1], qf[ks], r[2], r[3]);
      }
    }
    const int key0 = j * BN;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    }
    if (key0 + BN > Lv) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (key0 + nt * 8 + 2 * t + (e & 1) >= Lv) s[nt][e] = -INFINITY;
        }
      }
    }
    // Online softmax; every tile processed holds at least one valid key, so the new max is finite.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hh], s[nt][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(row_max[hh], mx);
      const float alpha = exp2f(row_max[hh] - mnew);
      row_max[hh] = mnew;
      float rs = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * hh] = exp2f(s[nt][2 * hh] - mnew);
        s[nt][2 * hh + 1] = exp2f(s[nt][2 * hh + 1] - mnew);
        rs += s[nt][2 * hh] + s[nt][2 * hh + 1];
      }
      row_sum[hh] = row_sum[hh] * alpha + rs;
#pragma unroll
      for (int dt = 0; dt < DP / 8; ++dt) {
        o[dt][2 * hh] *= alpha;
        o[dt][2 * hh + 1] *= alpha;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < DP / 16; ++dp) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, bt_frag_addr<DP>(cV, kk * 16, dp * 16, lane));
        mma_16816<T>(o[2 * dp], pa, r[0], r[1]);
        mma_16816<T>(o[2 * dp + 1], pa, r[2], r[3]);
      }
    }
    __syncthreads();  // stage st is refilled by the next iteration's prefetch
  }

  float total[2], inv[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = row_sum[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    total[hh] = l;
    inv[hh] = l > 0.f ? 1.f / l : 0.f;
  }
  cp_async_wait<0>();  // with no key tile the Q copy may still be in flight
  __syncthreads();
  acc_rows_to_smem<T, DP>(sQ, warp * 16, o, inv[0], inv[1], lane);
  __syncwarp();
  T* ob = out + (static_cast<int64_t>(b) * N * H + h) * D;
  smem_rows_to_global<T, D, DP>(ob, stride, sQ, warp * 16, m0 + warp * 16, N, lane);
  if (t == 0) {
    float* lb = lse + (static_cast<int64_t>(b) * H + h) * N;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = m0 + warp * 16 + g + 8 * hh;
      if (row < N) lb[row] = total[hh] > 0.f ? (row_max[hh] + log2f(total[hh])) * kLn2 : -INFINITY;
    }
  }
}

}  // namespace

template <class T, int D>
cudaError_t attention_fwd_tc(const AttentionShape& s, const void* q, const void* k, const void* v,
                             const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream) {
  using K = FwdKernel<T, D>;
  auto kernel = attn_fwd_kernel<T, D>;
  cudaError_t err = allow_smem(kernel, K::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(s.N, K::BM)), static_cast<unsigned>(s.H),
                  static_cast<unsigned>(s.B));
  kernel<<<grid, K::NT, K::kSmem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                            static_cast<const T*>(v), key_lengths, static_cast<T*>(out),
                                            static_cast<float*>(lse), static_cast<int>(s.N), static_cast<int>(s.L),
                                            static_cast<int>(s.H), static_cast<float>(scale * kLog2e));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dalle3_fast
