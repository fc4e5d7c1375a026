// GroupNorm (+ add, scale/shift modulation) + SiLU, forward and backward, for
// channels-first (B, C, S) and channels-last (B, S, C) tensors.
//
// Channels-first tensors whose group fits in shared memory take the single-pass path: one CTA
// per (b, g) reads the group once into shared memory, takes exact two-pass statistics there and
// writes y (backward: dx, and per-channel sums for dweight/dbias) from it. GroupNormParams::path
// forces one path or the other, for tests.
//
// Otherwise every pass walks the tensor with one of two traversals:
//   channels-first: one warp per (b*C + c, segment of S): per-channel constants are scalars;
//   channels-last:  one block per (row chunk, b), each thread owns VEC adjacent channels and
//                   walks rows, so per-channel constants live in registers.
// Forward:  stats (partial shifted sums per channel and chunk) -> finalize (mean/rstd per group,
//           per-channel coefficients) -> apply (y).
// Backward: stats (sum dy1, dy1*n, n per channel and chunk) -> finalize (dshift, dscale, dadd,
//           group means of dn and dn*n) -> dweight/dbias -> apply (dx).
// Sums are taken of x - K_g with K_g one element of the group, so partial sums of the same
// group combine by addition and var = E[(x-K)^2] - E[x-K]^2 does not cancel catastrophically.
// Partials are combined in a fixed order: results are deterministic.
// The apply passes walk the tensor in the reverse order of the stats passes so the most
// recently read data is still in L2 when re-read.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

constexpr int kWarpsCF = 8;          // warps per block, channels-first traversal
constexpr int kMaxThreadsCL = 512;   // threads per block, channels-last traversal
constexpr int kFinalizeThreads = 256;
constexpr int64_t kSegQuantum = 256; // channels-first segments are multiples of 32 lanes * 8

// ------------------------------------------------------------------ per-element operations

template <class A>
__device__ __forceinline__ A silu_grad(A z, A dy) {
  const A s = recip(A(1) + fast_exp(-z));
  return dy * s * (A(1) + z * (A(1) - s));
}

// Sizes the per-channel operations need; B * C < 2^31 (checked by the launcher).
struct GnDims {
  int64_t B, C, S, G, nch;
  bool cl;
};

// Shift of group g of sample b: x + add at the group's first element.
template <class T, class A>
__device__ __forceinline__ A group_shift(const GnDims& d, const T* __restrict__ x, ParamIn add, int b, int g) {
  const int64_t c0 = static_cast<int64_t>(g) * (d.C / d.G);
  const int64_t first = d.cl ? b * d.S * d.C + c0 : (b * d.C + c0) * d.S;
  return to_acc<A>(x[first]) + load_param<A>(add, b * d.C + c0, A(0));
}

template <class T, class A>
struct FwdStatsOp {
  static constexpr int NQ = 2;
  static constexpr bool kReadDy = false, kWrite = false, kReverse = false;
  struct Coef {
    A o;  // add[b, c] - K_g
  };
  GnDims d;
  const T* x;
  ParamIn add;
  __device__ Coef coef(int64_t bc) const {
    const int C = static_cast<int>(d.C), i = static_cast<int>(bc), b = i / C, c = i - b * C;
    const int g = c / (C / static_cast<int>(d.G));
    return {load_param<A>(add, bc, A(0)) - group_shift<T, A>(d, x, add, b, g)};
  }
  __device__ void reduce(const Coef& k, A x, A, A* q) const {
    const A u = x + k.o;
    q[0] += u;
    q[1] += u * u;
  }
  __device__ A apply(const Coef&, A, A) const { return A(0); }
};

template <class A>
struct FwdApplyOp {
  static constexpr int NQ = 0;
  static constexpr bool kReadDy = false, kWrite = true, kReverse = true;
  struct Coef {
    A m, a, b;
  };
  const A *m, *a, *b;  // y1 = (x - m) * a + b
  bool silu;
  __device__ Coef coef(int64_t bc) const { return {m[bc], a[bc], b[bc]}; }
  __device__ void reduce(const Coef&, A, A, A*) const {}
  __device__ A apply(const Coef& k, A x, A) const {
    const A z = (x - k.m) * k.a + k.b;
    return silu ? z * recip(A(1) + fast_exp(-z)) : z;
  }
};

// n = (x - m) * r, y1 = n * ws + bs for channel c of sample b.
template <class A>
struct BwdCoef {
  A m, r, ws, bs;
};

template <class A>
__device__ __forceinline__ BwdCoef<A> bwd_coef(const GnDims& d, const GroupNormParams& p, const A* __restrict__ mean,
                                               const A* __restrict__ rstd, int64_t bc) {
  const int C = static_cast<int>(d.C), i = static_cast<int>(bc), b = i / C, c = i - b * C;
  const int bg = b * static_cast<int>(d.G) + c / (C / static_cast<int>(d.G));
  const A w = load_param<A>(p.weight, c, A(1)), bi = load_param<A>(p.bias, c, A(0));
  const A sc = A(1) + load_param<A>(p.scale, bc, A(0)), sh = load_param<A>(p.shift, bc, A(0));
  return {mean[bg] - load_param<A>(p.add, bc, A(0)), rstd[bg], w * sc, bi * sc + sh};
}

template <class A>
struct BwdStatsOp {
  static constexpr int NQ = 3;
  static constexpr bool kReadDy = true, kWrite = false, kReverse = false;
  using Coef = BwdCoef<A>;
  GnDims d;
  GroupNormParams p;
  const A *mean, *rstd;
  bool silu;
  __device__ Coef coef(int64_t bc) const { return bwd_coef<A>(d, p, mean, rstd, bc); }
  __device__ void reduce(const Coef& k, A x, A dy, A* q) const {
    const A n = (x - k.m) * k.r;
    const A g = silu ? silu_grad(n * k.ws + k.bs, dy) : dy;
    q[0] += g;
    q[1] += g * n;
    q[2] += n;
  }
  __device__ A apply(const Coef&, A, A) const { return A(0); }
};

template <class A>
struct BwdApplyOp {
  static constexpr int NQ = 0;
  static constexpr bool kReadDy = true, kWrite = true, kReverse = true;
  struct Coef {
    A m, r, ws, bs, k2, k3;  // dx = r * ws * dy1 - k2 - k3 * n
  };
  GnDims d;
  GroupNormParams p;
  const A *mean, *rstd, *k2, *k3;
  bool silu;
  __device__ Coef coef(int64_t bc) const {
    const BwdCoef<A> k = bwd_coef<A>(d, p, mean, rstd, bc);
    return {k.m, k.r, k.ws, k.bs, k2[bc], k3[bc]};
  }
  __device__ void reduce(const Coef&, A, A, A*) const {}
  __device__ A apply(const Coef& k, A x, A dy) const {
    const A n = (x - k.m) * k.r;
    const A g = silu ? silu_grad(n * k.ws + k.bs, dy) : dy;
    return g * (k.r * k.ws) - k.k2 - k.k3 * n;
  }
};

// ------------------------------------------------------------------ traversals

// Channels-first: warp `task` = row * nseg + seg covers x[row, seg*seg_elems : ...] of a (rows, S)
// matrix. S % VEC == 0; seg_elems % (32 * VEC) == 0. partial[task][NQ].
template <class T, int VEC, class Op>
__global__ void __launch_bounds__(kWarpsCF * 32, 1)
gn_cf_kernel(Op op, const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
             acc_t<T>* __restrict__ partial, int64_t rows, int64_t S, int64_t nseg, int64_t seg_elems) {
  using A = acc_t<T>;
  constexpr int NQ = Op::NQ > 0 ? Op::NQ : 1;
  const int lane = threadIdx.x & 31;
  // The launcher guarantees rows * nseg < 2^32: 32-bit division stays inline.
  const uint32_t ntasks = static_cast<uint32_t>(rows * nseg);
  uint32_t task = blockIdx.x * kWarpsCF + (threadIdx.x >> 5);
  if (task >= ntasks) return;  // whole warps only
  if (Op::kReverse) task = ntasks - 1 - task;
  const uint32_t row32 = task / static_cast<uint32_t>(nseg);
  const int64_t row = row32, seg = task - row32 * static_cast<uint32_t>(nseg);
  const typename Op::Coef k = op.coef(row);
  const int64_t e1 = min((seg + 1) * seg_elems, S);
  const int64_t base = row * S;
  A q[NQ];
#pragma unroll
  for (int i = 0; i < NQ; ++i) q[i] = A(0);
#pragma unroll 2
  for (int64_t e = seg * seg_elems + lane * VEC; e < e1; e += 32 * VEC) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + base + e);
    Vec<T, VEC> gv;
    if constexpr (Op::kReadDy) gv = load_vec<T, VEC>(dy + base + e);
    Vec<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A xa = to_acc<A>(xv.v[j]);
      A ga = A(0);
      if constexpr (Op::kReadDy) ga = to_acc<A>(gv.v[j]);
      if constexpr (Op::NQ > 0) {
        op.reduce(k, xa, ga, q);
      } else {
        ov.v[j] = from_acc<T>(op.apply(k, xa, ga));
      }
    }
    if constexpr (Op::kWrite) store_vec<T, VEC>(out + base + e, ov);
  }
  if constexpr (Op::NQ > 0) {
#pragma unroll
    for (int i = 0; i < NQ; ++i) q[i] = warp_sum(q[i]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < NQ; ++i) partial[static_cast<int64_t>(task) * NQ + i] = q[i];
    }
  }
}

// Channels-last: block (chunk, b) covers rows [chunk*rpc, (chunk+1)*rpc) of sample b of a
// (B, S, C) tensor. Threads form `ncols` column lanes (VEC channels each) x blockDim/ncols row
// lanes; when C / VEC > ncols the block makes several passes over its rows.
// partial[b][chunk][c][NQ]; dynamic shared memory: blockDim * VEC accumulators when NQ > 0.
template <class T, int VEC, class Op>
__global__ void __launch_bounds__(kMaxThreadsCL, 1)
gn_cl_kernel(Op op, const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
             acc_t<T>* __restrict__ partial, int64_t S, int C, int64_t nch, int64_t rpc, int ncols) {
  using A = acc_t<T>;
  constexpr int NQ = Op::NQ > 0 ? Op::NQ : 1;
  extern __shared__ __align__(16) unsigned char gn_smem[];
  A* red = reinterpret_cast<A*>(gn_smem);
  const int tc = threadIdx.x % ncols, rr = threadIdx.x / ncols, rpi = blockDim.x / ncols;
  const int64_t ch = Op::kReverse ? nch - 1 - blockIdx.x : blockIdx.x;
  const int64_t b = Op::kReverse ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  const int64_t s0 = ch * rpc, s1 = min(s0 + rpc, S);
  const int ncv = C / VEC;
  for (int cv0 = 0; cv0 < ncv; cv0 += ncols) {
    const bool active = cv0 + tc < ncv && rr < rpi;
    const int c = (cv0 + tc) * VEC;
    typename Op::Coef k[VEC];
    A q[VEC][NQ];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
#pragma unroll
      for (int i = 0; i < NQ; ++i) q[j][i] = A(0);
    }
    if (active) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) k[j] = op.coef(b * C + c + j);
      // 32-bit row counter: a 64-bit trip count would cost a division subroutine call.
      const int nrows = static_cast<int>(s1 - s0);
      for (int r = rr; r < nrows; r += rpi) {
        const int64_t idx = (b * S + s0 + r) * C + c;
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + idx);
        Vec<T, VEC> gv;
        if constexpr (Op::kReadDy) gv = load_vec<T, VEC>(dy + idx);
        Vec<T, VEC> ov;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A xa = to_acc<A>(xv.v[j]);
          A ga = A(0);
          if constexpr (Op::kReadDy) ga = to_acc<A>(gv.v[j]);
          if constexpr (Op::NQ > 0) {
            op.reduce(k[j], xa, ga, q[j]);
          } else {
            ov.v[j] = from_acc<T>(op.apply(k[j], xa, ga));
          }
        }
        if constexpr (Op::kWrite) store_vec<T, VEC>(out + idx, ov);
      }
    }
    if constexpr (Op::NQ > 0) {
      const int width = ncols * VEC;
#pragma unroll
      for (int i = 0; i < NQ; ++i) {
        __syncthreads();
        if (active) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) red[rr * width + tc * VEC + j] = q[j][i];
        }
        __syncthreads();
        for (int cc = threadIdx.x; cc < width; cc += blockDim.x) {
          const int cg = cv0 * VEC + cc;
          if (cg < C) {
            A s = A(0);
            for (int r = 0; r < rpi; ++r) s += red[r * width + cc];
            partial[((b * nch + ch) * C + cg) * NQ + i] = s;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ small per-channel kernels

__device__ __forceinline__ int64_t partial_index(const GnDims& d, int64_t b, int64_t c, int64_t chunk) {
  return d.cl ? (b * d.nch + chunk) * d.C + c : (b * d.C + c) * d.nch + chunk;
}

template <class T, class A>
__global__ void __launch_bounds__(kFinalizeThreads)
gn_fwd_finalize_kernel(GnDims d, GroupNormParams p, A eps, const T* __restrict__ x, const A* __restrict__ partial,
                       A* __restrict__ mean_out, A* __restrict__ rstd_out, A* __restrict__ cm, A* __restrict__ ca,
                       A* __restrict__ cb) {
  __shared__ A scratch[32];
  const int G = static_cast<int>(d.G), nch = static_cast<int>(d.nch);
  const int bg = blockIdx.x, b = bg / G, g = bg - b * G, Cg = static_cast<int>(d.C) / G;
  A s1 = A(0), s2 = A(0);
  for (int i = threadIdx.x; i < Cg * nch; i += blockDim.x) {
    const int q = d.cl ? i / Cg : i / nch, r = d.cl ? i - q * Cg : i - q * nch;
    const int c = g * Cg + (d.cl ? r : q), chunk = d.cl ? q : r;
    const int64_t idx = partial_index(d, b, c, chunk);
    s1 += partial[idx * 2];
    s2 += partial[idx * 2 + 1];
  }
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  const A inv_n = recip(static_cast<A>(Cg * d.S));
  const A m1 = s1 * inv_n;
  const A var = max(s2 * inv_n - m1 * m1, A(0));
  const A mean = group_shift<T, A>(d, x, p.add, b, g) + m1;
  const A rstd = rsqrt_(var + eps);
  if (threadIdx.x == 0) {
    mean_out[bg] = mean;
    rstd_out[bg] = rstd;
  }
  for (int c = g * Cg + threadIdx.x; c < (g + 1) * Cg; c += blockDim.x) {
    const int64_t bc = b * d.C + c;
    const A w = load_param<A>(p.weight, c, A(1)), bi = load_param<A>(p.bias, c, A(0));
    const A sc = A(1) + load_param<A>(p.scale, bc, A(0)), sh = load_param<A>(p.shift, bc, A(0));
    cm[bc] = mean - load_param<A>(p.add, bc, A(0));
    ca[bc] = rstd * w * sc;
    cb[bc] = bi * sc + sh;
  }
}

struct GnBwdOut {
  ParamOut dadd, dscale, dshift;
};

template <class A>
__global__ void __launch_bounds__(kFinalizeThreads)
gn_bwd_finalize_kernel(GnDims d, GroupNormParams p, GnBwdOut o, const A* __restrict__ partial,
                       const A* __restrict__ rstd, A* __restrict__ sa,
                       A* __restrict__ sb, A* __restrict__ sn, A* __restrict__ k2, A* __restrict__ k3,
                       A* __restrict__ pa, A* __restrict__ pb) {
  __shared__ A scratch[32];
  const int G = static_cast<int>(d.G);
  const int bg = blockIdx.x, b = bg / G, g = bg - b * G, Cg = static_cast<int>(d.C) / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t cl = warp; cl < Cg; cl += nwarps) {
    const int64_t c = g * Cg + cl;
    A qa = A(0), qb = A(0), qn = A(0);
    for (int64_t chunk = lane; chunk < d.nch; chunk += 32) {
      const int64_t idx = partial_index(d, b, c, chunk) * 3;
      qa += partial[idx];
      qb += partial[idx + 1];
      qn += partial[idx + 2];
    }
    qa = warp_sum(qa);
    qb = warp_sum(qb);
    qn = warp_sum(qn);
    if (lane == 0) {
      sa[b * d.C + c] = qa;
      sb[b * d.C + c] = qb;
      sn[b * d.C + c] = qn;
    }
  }
  __syncthreads();
  A t1 = A(0), t2 = A(0);
  for (int64_t cl = threadIdx.x; cl < Cg; cl += blockDim.x) {
    const int64_t c = g * Cg + cl, bc = b * d.C + c;
    const A ws = load_param<A>(p.weight, c, A(1)) * (A(1) + load_param<A>(p.scale, bc, A(0)));
    t1 += ws * sa[bc];
    t2 += ws * sb[bc];
  }
  t1 = block_sum(t1, scratch);
  t2 = block_sum(t2, scratch);
  const A inv_n = recip(static_cast<A>(Cg * d.S));
  const A mdn = t1 * inv_n, mdnn = t2 * inv_n, r = rstd[bg];
  for (int64_t cl = threadIdx.x; cl < Cg; cl += blockDim.x) {
    const int64_t c = g * Cg + cl, bc = b * d.C + c;
    const A qa = sa[bc], qb = sb[bc], qn = sn[bc];
    const A w = load_param<A>(p.weight, c, A(1)), bi = load_param<A>(p.bias, c, A(0));
    const A sc = A(1) + load_param<A>(p.scale, bc, A(0)), ws = w * sc;
    store_param<A>(o.dshift, bc, p.shift.ptr ? qa : A(0));
    store_param<A>(o.dscale, bc, p.scale.ptr ? w * qb + bi * qa : A(0));
    store_param<A>(o.dadd, bc,
                   p.add.ptr ? r * (ws * qa - static_cast<A>(d.S) * mdn - mdnn * qn) : A(0));
    k2[bc] = r * mdn;
    k3[bc] = r * mdnn;
    pa[bc] = sc * qa;
    pb[bc] = sc * qb;
  }
}

template <class A>
__global__ void gn_dweight_dbias_kernel(int64_t B, int64_t C, const A* __restrict__ pa, const A* __restrict__ pb,
                                        ParamOut dweight, ParamOut dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A db = A(0), dw = A(0);
  for (int64_t b = 0; b < B; ++b) {
    db += pa[b * C + c];
    dw += pb[b * C + c];
  }
  store_param<A>(dbias, c, db);
  store_param<A>(dweight, c, dw);
}

// ------------------------------------------------------------------ single-pass path (channels-first)

constexpr int kFusedThreads = 512;
constexpr int kFusedUnroll = 4;  // 16-byte loads in flight per thread and tensor while caching the group

// Copies n elements (n % VEC == 0) from global to shared memory, calling f(i, vec) on each vector.
template <class T, int VEC, class F>
__device__ __forceinline__ void cache_group(T* __restrict__ dst, const T* __restrict__ src, int n, F&& f) {
  const int step = blockDim.x * VEC;
  for (int i0 = threadIdx.x * VEC; i0 < n; i0 += kFusedUnroll * step) {
    Vec<T, VEC> v[kFusedUnroll];
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      if (i0 + u * step < n) v[u] = load_vec<T, VEC>(src + i0 + u * step);
    }
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      if (i0 + u * step < n) {
        store_vec<T, VEC>(dst + i0 + u * step, v[u]);
        f(i0 + u * step, v[u]);
      }
    }
  }
}

// Shared memory of the single-pass kernels: NCOEF per-channel arrays of acc type, 32 reduction
// slots, then the cached group (NTENSORS tensors of Cg * S elements of T).
template <class A>
__host__ __device__ constexpr size_t fused_coef_bytes(int64_t Cg, int ncoef) {
  return (static_cast<size_t>(ncoef * Cg + 32) * sizeof(A) + 15) / 16 * 16;
}
constexpr int kFusedFwdCoefs = 3, kFusedBwdCoefs = 6;

template <class T, int VEC>
__global__ void __launch_bounds__(kFusedThreads, 1)
gn_fused_fwd_kernel(GnDims d, GroupNormParams p, acc_t<T> eps, const T* __restrict__ x, T* __restrict__ y,
                    acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ rstd_out) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char gn_smem[];
  const int G = static_cast<int>(d.G), C = static_cast<int>(d.C), Cg = C / G, S = static_cast<int>(d.S);
  const int bg = blockIdx.x, b = bg / G, g = bg - b * G, n = Cg * S;
  A* cadd = reinterpret_cast<A*>(gn_smem);  // add, then the apply coefficients m, a, b
  A* ca = cadd + Cg;
  A* cb = ca + Cg;
  A* scratch = cb + Cg;
  T* sx = reinterpret_cast<T*>(gn_smem + fused_coef_bytes<A>(Cg, kFusedFwdCoefs));
  const int64_t base = (static_cast<int64_t>(b) * C + g * Cg) * S;
  for (int c = threadIdx.x; c < Cg; c += blockDim.x) cadd[c] = load_param<A>(p.add, b * C + g * Cg + c, A(0));
  __syncthreads();
  A s1 = A(0);
  cache_group<T, VEC>(sx, x + base, n, [&](int i, const Vec<T, VEC>& v) {
    const A ad = cadd[i / S];
#pragma unroll
    for (int j = 0; j < VEC; ++j) s1 += to_acc<A>(v.v[j]) + ad;
  });
  const A inv_n = recip(static_cast<A>(n));
  const A mean = block_sum(s1, scratch) * inv_n;
  A s2 = A(0);
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {  // this thread's own shared-memory writes
    const Vec<T, VEC> v = load_vec<T, VEC>(sx + i);
    const A ad = cadd[i / S] - mean;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A u = to_acc<A>(v.v[j]) + ad;
      s2 += u * u;
    }
  }
  const A rstd = rsqrt_(block_sum(s2, scratch) * inv_n + eps);  // block_sum ends the reads of cadd
  for (int c = threadIdx.x; c < Cg; c += blockDim.x) {
    const int64_t bc = static_cast<int64_t>(b) * C + g * Cg + c;
    const A w = load_param<A>(p.weight, g * Cg + c, A(1)), bi = load_param<A>(p.bias, g * Cg + c, A(0));
    const A sc = A(1) + load_param<A>(p.scale, bc, A(0)), sh = load_param<A>(p.shift, bc, A(0));
    cadd[c] = mean - cadd[c];
    ca[c] = rstd * w * sc;
    cb[c] = bi * sc + sh;
  }
  __syncthreads();
  const FwdApplyOp<A> op{cadd, ca, cb, p.silu};
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    const Vec<T, VEC> v = load_vec<T, VEC>(sx + i);
    const typename FwdApplyOp<A>::Coef k = op.coef(i / S);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_acc<T>(op.apply(k, to_acc<A>(v.v[j]), A(0)));
    store_vec<T, VEC>(y + base + i, o);
  }
  if (threadIdx.x == 0) {
    mean_out[bg] = mean;
    rstd_out[bg] = rstd;
  }
}

// Backward of one (b, g): per-channel sums by one warp per channel over the cached x and dy,
// then dx. dadd/dscale/dshift are written here; (1 + scale) * sums go to pa/pb for dweight/dbias.
template <class T, int VEC>
__global__ void __launch_bounds__(kFusedThreads, 1)
gn_fused_bwd_kernel(GnDims d, GroupNormParams p, GnBwdOut o, const T* __restrict__ dy, const T* __restrict__ x,
                    const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,
                    acc_t<T>* __restrict__ pa, acc_t<T>* __restrict__ pb) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char gn_smem[];
  const int G = static_cast<int>(d.G), C = static_cast<int>(d.C), Cg = C / G, S = static_cast<int>(d.S);
  const int bg = blockIdx.x, b = bg / G, g = bg - b * G, n = Cg * S;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  A* cm = reinterpret_cast<A*>(gn_smem);  // n = (x - m) * r, y1 = n * ws + bs
  A* cws = cm + Cg;
  A* cbs = cws + Cg;
  A* sa = cbs + Cg;  // sum dy1, sum dy1 * n, sum n per channel
  A* sb = sa + Cg;
  A* sn = sb + Cg;
  A* scratch = sn + Cg;
  T* sx = reinterpret_cast<T*>(gn_smem + fused_coef_bytes<A>(Cg, kFusedBwdCoefs));
  T* sdy = sx + n;  // n * sizeof(T) is a multiple of 16 when VEC > 1 (S % VEC == 0)
  const int64_t base = (static_cast<int64_t>(b) * C + g * Cg) * S;
  const A r = rstd[bg];
  for (int c = threadIdx.x; c < Cg; c += blockDim.x) {
    const BwdCoef<A> k = bwd_coef<A>(d, p, mean, rstd, static_cast<int64_t>(b) * C + g * Cg + c);
    cm[c] = k.m;
    cws[c] = k.ws;
    cbs[c] = k.bs;
  }
  cache_group<T, VEC>(sx, x + base, n, [](int, const Vec<T, VEC>&) {});
  cache_group<T, VEC>(sdy, dy + base, n, [](int, const Vec<T, VEC>&) {});
  __syncthreads();
  for (int c = warp; c < Cg; c += nwarps) {
    const A m = cm[c], ws = cws[c], bs = cbs[c];
    A qa = A(0), qb = A(0), qn = A(0);
    for (int s = lane * VEC; s < S; s += 32 * VEC) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(sx + c * S + s), gv = load_vec<T, VEC>(sdy + c * S + s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A nn = (to_acc<A>(xv.v[j]) - m) * r;
        const A gg = p.silu ? silu_grad(nn * ws + bs, to_acc<A>(gv.v[j])) : to_acc<A>(gv.v[j]);
        qa += gg;
        qb += gg * nn;
        qn += nn;
      }
    }
    qa = warp_sum(qa);
    qb = warp_sum(qb);
    qn = warp_sum(qn);
    if (lane == 0) {
      sa[c] = qa;
      sb[c] = qb;
      sn[c] = qn;
    }
  }
  __syncthreads();
  A t1 = A(0), t2 = A(0);
  for (int c = threadIdx.x; c < Cg; c += blockDim.x) {
    t1 += cws[c] * sa[c];
    t2 += cws[c] * sb[c];
  }
  const A inv_n = recip(static_cast<A>(n));
  const A mdn = block_sum(t1, scratch) * inv_n, mdnn = block_sum(t2, scratch) * inv_n;
  for (int c = threadIdx.x; c < Cg; c += blockDim.x) {
    const int64_t bc = static_cast<int64_t>(b) * C + g * Cg + c;
    const A qa = sa[c], qb = sb[c], qn = sn[c];
    const A w = load_param<A>(p.weight, g * Cg + c, A(1)), bi = load_param<A>(p.bias, g * Cg + c, A(0));
    const A sc = A(1) + load_param<A>(p.scale, bc, A(0));
    store_param<A>(o.dshift, bc, p.shift.ptr ? qa : A(0));
    store_param<A>(o.dscale, bc, p.scale.ptr ? w * qb + bi * qa : A(0));
    store_param<A>(o.dadd, bc, p.add.ptr ? r * (cws[c] * qa - static_cast<A>(S) * mdn - mdnn * qn) : A(0));
    pa[bc] = sc * qa;
    pb[bc] = sc * qb;
  }
  const A k2 = r * mdn, k3 = r * mdnn;
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    const int c = i / S;
    const A m = cm[c], ws = cws[c], bs = cbs[c];
    const Vec<T, VEC> xv = load_vec<T, VEC>(sx + i), gv = load_vec<T, VEC>(sdy + i);
    Vec<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A nn = (to_acc<A>(xv.v[j]) - m) * r;
      const A gg = p.silu ? silu_grad(nn * ws + bs, to_acc<A>(gv.v[j])) : to_acc<A>(gv.v[j]);
      ov.v[j] = from_acc<T>(gg * (r * ws) - k2 - k3 * nn);
    }
    store_vec<T, VEC>(dx + base + i, ov);
  }
}

// ------------------------------------------------------------------ planning

struct GnPlan {
  int64_t nch = 1;        // segments per row (CF) or row chunks per sample (CL)
  int64_t seg_elems = 0;  // CF
  int64_t rpc = 0;        // CL rows per chunk
};

GnPlan make_plan(const GroupNormShape& s) {
  const int64_t sms = device_sm_count();
  GnPlan p;
  if (!s.channels_last) {
    const int64_t rows = s.B * s.C;
    // About two waves of warps, each warp at least 1024 elements, segments never past a row.
    int64_t seg = std::max<int64_t>(1024, ceil_div(rows * s.S, 128 * sms));
    seg = std::min(round_up(seg, kSegQuantum), round_up(s.S, kSegQuantum));
    p.seg_elems = seg;
    p.nch = ceil_div(s.S, seg);
  } else {
    // About eight 512-thread blocks per SM in all, each at least 32 rows.
    const int64_t want = std::max<int64_t>(1, std::min(ceil_div(8 * sms, s.B), ceil_div(s.S, 32)));
    p.rpc = ceil_div(s.S, want);
    p.nch = ceil_div(s.S, p.rpc);
  }
  return p;
}

struct GnWorkspace {
  // Per-(b, c) arrays of acc type, each padded to 16 elements, then the partial sums.
  static constexpr int kFwdArrays = 3;  // m, a, b
  static constexpr int kBwdArrays = 7;  // sa, sb, sn, k2, k3, pa, pb
  int64_t bc_pad, partial;
  size_t elem;
  size_t bytes(bool backward) const {
    return elem * static_cast<size_t>((backward ? kBwdArrays : kFwdArrays) * bc_pad + partial * (backward ? 3 : 2));
  }
};

GnWorkspace workspace_layout(const GroupNormShape& s, const GnPlan& p) {
  GnWorkspace w;
  w.bc_pad = round_up(s.B * s.C, 16);
  w.partial = s.B * s.C * p.nch;
  w.elem = s.dtype == DType::kFloat64 ? 8 : 4;
  return w;
}

// Column lanes and row lanes of a channels-last block.
void cl_block(int64_t C, int vec, int* ncols, int* threads) {
  const int64_t ncv = C / vec;
  *ncols = static_cast<int>(std::min<int64_t>(ncv, kMaxThreadsCL));
  *threads = (kMaxThreadsCL / *ncols) * *ncols;
}

template <class T, int VEC, class Op>
cudaError_t run_traversal(const GroupNormShape& s, const GnPlan& p, const Op& op, const T* x, const T* dy, T* out,
                          acc_t<T>* partial, cudaStream_t stream) {
  if (!s.channels_last) {
    const int64_t tasks = s.B * s.C * p.nch;
    const int64_t blocks = ceil_div(tasks, kWarpsCF);
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    gn_cf_kernel<T, VEC, Op><<<static_cast<unsigned>(blocks), kWarpsCF * 32, 0, stream>>>(
        op, x, dy, out, partial, s.B * s.C, s.S, p.nch, p.seg_elems);
  } else {
    int ncols, threads;
    cl_block(s.C, VEC, &ncols, &threads);
    const size_t smem = Op::NQ > 0 ? static_cast<size_t>(threads) * VEC * sizeof(acc_t<T>) : 0;
    if (s.B > 65535 || p.nch > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    gn_cl_kernel<T, VEC, Op><<<dim3(static_cast<unsigned>(p.nch), static_cast<unsigned>(s.B)), threads, smem,
                               stream>>>(op, x, dy, out, partial, s.S, static_cast<int>(s.C), p.nch, p.rpc, ncols);
  }
  return cudaGetLastError();
}

template <class T>
bool use_vec(const GroupNormShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if ((s.channels_last ? s.C : s.S) % V != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

GnDims dims_of(const GroupNormShape& s, const GnPlan& p) {
  return GnDims{s.B, s.C, s.S, s.G, p.nch, s.channels_last};
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>(ceil_div(n, threads)); }

// Shared memory of the single-pass kernels for this shape (0 when it does not apply).
size_t fused_smem_bytes(const GroupNormShape& s, bool backward) {
  if (s.channels_last) return 0;
  const size_t elem = dtype_size(s.dtype), acc = s.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t Cg = s.C / s.G;
  const size_t coef = ((backward ? kFusedBwdCoefs : kFusedFwdCoefs) * Cg + 32) * acc;
  return (coef + 15) / 16 * 16 + (backward ? 2 : 1) * static_cast<size_t>(Cg * s.S) * elem;
}

bool use_fused(const GroupNormShape& s, GnPath path, bool backward) {
  const size_t bytes = fused_smem_bytes(s, backward);
  if (bytes == 0 || path == GnPath::kMultiPass || bytes > static_cast<size_t>(device_smem_optin())) return false;
  // One CTA per group: past ~200 KB a group takes too long for one SM to stream.
  return path == GnPath::kSinglePass || bytes <= 200 * 1024;
}

template <class T, int VEC>
cudaError_t launch_fused_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                             acc_t<T>* mean, acc_t<T>* rstd, cudaStream_t stream) {
  const size_t smem = fused_smem_bytes(s, false);
  cudaError_t err = allow_smem(gn_fused_fwd_kernel<T, VEC>, smem);
  if (err != cudaSuccess) return err;
  const GnDims d{s.B, s.C, s.S, s.G, 1, false};
  gn_fused_fwd_kernel<T, VEC><<<static_cast<unsigned>(s.B * s.G), kFusedThreads, smem, stream>>>(
      d, prm, static_cast<acc_t<T>>(eps), x, y, mean, rstd);
  return cudaGetLastError();
}

template <class T, int VEC>
cudaError_t launch_fused_bwd(const GroupNormShape& s, const GroupNormParams& prm, const T* dy, const T* x,
                             const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, GnBwdOut outs, acc_t<T>* pa,
                             acc_t<T>* pb, cudaStream_t stream) {
  const size_t smem = fused_smem_bytes(s, true);
  cudaError_t err = allow_smem(gn_fused_bwd_kernel<T, VEC>, smem);
  if (err != cudaSuccess) return err;
  const GnDims d{s.B, s.C, s.S, s.G, 1, false};
  gn_fused_bwd_kernel<T, VEC><<<static_cast<unsigned>(s.B * s.G), kFusedThreads, smem, stream>>>(
      d, prm, outs, dy, x, mean, rstd, dx, pa, pb);
  return cudaGetLastError();
}

template <class T>
cudaError_t gn_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                   acc_t<T>* mean, acc_t<T>* rstd, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (use_fused(s, prm.path, false)) {
    return use_vec<T>(s, {x, y}) ? launch_fused_fwd<T, 16 / sizeof(T)>(s, prm, eps, x, y, mean, rstd, stream)
                                 : launch_fused_fwd<T, 1>(s, prm, eps, x, y, mean, rstd, stream);
  }
  const GnPlan plan = make_plan(s);
  const GnWorkspace lay = workspace_layout(s, plan);
  const GnDims d = dims_of(s, plan);
  A* ws = static_cast<A*>(workspace);
  A *cm = ws, *ca = ws + lay.bc_pad, *cb = ws + 2 * lay.bc_pad;
  A* partial = ws + GnWorkspace::kFwdArrays * lay.bc_pad;

  const bool vec = use_vec<T>(s, {x, y});
  const FwdStatsOp<T, A> stats{d, x, prm.add};
  cudaError_t err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, stats, x, nullptr, nullptr, partial, stream)
                        : run_traversal<T, 1>(s, plan, stats, x, nullptr, nullptr, partial, stream);
  if (err != cudaSuccess) return err;
  gn_fwd_finalize_kernel<T, A><<<static_cast<unsigned>(s.B * s.G), kFinalizeThreads, 0, stream>>>(
      d, prm, static_cast<A>(eps), x, partial, mean, rstd, cm, ca, cb);
  const FwdApplyOp<A> apply{cm, ca, cb, prm.silu};
  err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, apply, x, nullptr, y, nullptr, stream)
            : run_traversal<T, 1>(s, plan, apply, x, nullptr, y, nullptr, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <class T>
cudaError_t gn_bwd(const GroupNormShape& s, const GroupNormParams& prm, const T* dy, const T* x, const acc_t<T>* mean,
                   const acc_t<T>* rstd, T* dx, ParamOut dweight, ParamOut dbias, GnBwdOut outs, void* workspace,
                   cudaStream_t stream) {
  using A = acc_t<T>;
  const GnPlan plan = make_plan(s);
  const GnWorkspace lay = workspace_layout(s, plan);
  const GnDims d = dims_of(s, plan);
  A* ws = static_cast<A*>(workspace);
  A* arr[GnWorkspace::kBwdArrays];
  for (int i = 0; i < GnWorkspace::kBwdArrays; ++i) arr[i] = ws + i * lay.bc_pad;
  A *sa = arr[0], *sb = arr[1], *sn = arr[2], *k2 = arr[3], *k3 = arr[4], *pa = arr[5], *pb = arr[6];
  A* partial = ws + GnWorkspace::kBwdArrays * lay.bc_pad;

  const bool vec = use_vec<T>(s, {x, dy, dx});
  if (use_fused(s, prm.path, true)) {
    const cudaError_t err =
        vec ? launch_fused_bwd<T, 16 / sizeof(T)>(s, prm, dy, x, mean, rstd, dx, outs, pa, pb, stream)
            : launch_fused_bwd<T, 1>(s, prm, dy, x, mean, rstd, dx, outs, pa, pb, stream);
    if (err != cudaSuccess) return err;
    gn_dweight_dbias_kernel<A><<<blocks_for(s.C, 256), 256, 0, stream>>>(s.B, s.C, pa, pb, dweight, dbias);
    return cudaGetLastError();
  }
  const BwdStatsOp<A> stats{d, prm, mean, rstd, prm.silu};
  cudaError_t err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, stats, x, dy, nullptr, partial, stream)
                        : run_traversal<T, 1>(s, plan, stats, x, dy, nullptr, partial, stream);
  if (err != cudaSuccess) return err;
  gn_bwd_finalize_kernel<A><<<static_cast<unsigned>(s.B * s.G), kFinalizeThreads, 0, stream>>>(
      d, prm, outs, partial, rstd, sa, sb, sn, k2, k3, pa, pb);
  gn_dweight_dbias_kernel<A><<<blocks_for(s.C, 256), 256, 0, stream>>>(s.B, s.C, pa, pb, dweight, dbias);
  const BwdApplyOp<A> apply{d, prm, mean, rstd, k2, k3, prm.silu};
  err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, apply, x, dy, dx, nullptr, stream)
            : run_traversal<T, 1>(s, plan, apply, x, dy, dx, nullptr, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

bool shape_ok(const GroupNormShape& s) {
  if (!(s.B > 0 && s.C > 0 && s.S > 0 && s.G > 0 && s.C % s.G == 0 && s.B <= 65535)) return false;
  const GnPlan p = make_plan(s);
  // 32-bit index math in the kernels.
  return s.B * s.C * p.nch < (int64_t(1) << 31);
}

}  // namespace

size_t group_norm_silu_workspace_bytes(const GroupNormShape& shape, bool backward) {
  if (!shape_ok(shape)) return 0;
  return workspace_layout(shape, make_plan(shape)).bytes(backward);
}

cudaError_t group_norm_silu_fwd(const GroupNormShape& s, const GroupNormParams& p, double eps, const void* x,
                                void* y, void* mean, void* rstd, void* workspace, cudaStream_t stream) {
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  switch (s.dtype) {
    case DType::kFloat32:
      return gn_fwd<float>(s, p, eps, static_cast<const float*>(x), static_cast<float*>(y),
                           static_cast<float*>(mean), static_cast<float*>(rstd), workspace, stream);
    case DType::kFloat16:
      return gn_fwd<__half>(s, p, eps, static_cast<const __half*>(x), static_cast<__half*>(y),
                            static_cast<float*>(mean), static_cast<float*>(rstd), workspace, stream);
    case DType::kBFloat16:
      return gn_fwd<__nv_bfloat16>(s, p, eps, static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y),
                                   static_cast<float*>(mean), static_cast<float*>(rstd), workspace, stream);
    case DType::kFloat64:
      return gn_fwd<double>(s, p, eps, static_cast<const double*>(x), static_cast<double*>(y),
                            static_cast<double*>(mean), static_cast<double*>(rstd), workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t group_norm_silu_bwd(const GroupNormShape& s, const GroupNormParams& p, const void* grad_y,
                                const void* x, const void* mean, const void* rstd, void* dx, ParamOut dweight,
                                ParamOut dbias, ParamOut dadd, ParamOut dscale, ParamOut dshift, void* workspace,
                                cudaStream_t stream) {
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  const GnBwdOut outs{dadd, dscale, dshift};
  switch (s.dtype) {
    case DType::kFloat32:
      return gn_bwd<float>(s, p, static_cast<const float*>(grad_y), static_cast<const float*>(x),
                           static_cast<const float*>(mean), static_cast<const float*>(rstd), static_cast<float*>(dx),
                           dweight, dbias, outs, workspace, stream);
    case DType::kFloat16:
      return gn_bwd<__half>(s, p, static_cast<const __half*>(grad_y), static_cast<const __half*>(x),
                            static_cast<const float*>(mean), static_cast<const float*>(rstd),
                            static_cast<__half*>(dx), dweight, dbias, outs, workspace, stream);
    case DType::kBFloat16:
      return gn_bwd<__nv_bfloat16>(s, p, static_cast<const __nv_bfloat16*>(grad_y),
                                   static_cast<const __nv_bfloat16*>(x), static_cast<const float*>(mean),
                                   static_cast<const float*>(rstd), static_cast<__nv_bfloat16*>(dx), dweight, dbias,
                                   outs, workspace, stream);
    case DType::kFloat64:
      return gn_bwd<double>(s, p, static_cast<const double*>(grad_y), static_cast<const double*>(x),
                            static_cast<const double*>(mean), static_cast<const double*>(rstd),
                            static_cast<double*>(dx), dweight, dbias, outs, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dalle3_fast
