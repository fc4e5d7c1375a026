// GroupNorm + SiLU, multi-pass path: any layout and size. Every pass walks the tensor with one
// of two traversals:
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

#include "group_norm_silu.cuh"

namespace dalle3_fast {
namespace cuda {
namespace gn {
namespace {

constexpr int kWarpsCF = 8;          // warps per block, channels-first traversal
constexpr int kMaxThreadsCL = 512;   // threads per block, channels-last traversal
constexpr int kFinalizeThreads = 256;

// ------------------------------------------------------------------ per-element operations

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

// ------------------------------------------------------------------ launch

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

GnDims dims_of(const GroupNormShape& s, const GnPlan& p) {
  return GnDims{s.B, s.C, s.S, s.G, p.nch, s.channels_last};
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>(ceil_div(n, threads)); }

}  // namespace

template <class A>
cudaError_t dweight_dbias(int64_t B, int64_t C, const A* pa, const A* pb, ParamOut dweight, ParamOut dbias,
                          cudaStream_t stream) {
  gn_dweight_dbias_kernel<A><<<blocks_for(C, 256), 256, 0, stream>>>(B, C, pa, pb, dweight, dbias);
  return cudaGetLastError();
}

template <class T>
cudaError_t multipass_fwd(const GroupNormShape& s, const GroupNormParams& prm, const GnPlan& plan, double eps,
                          const T* x, T* y, acc_t<T>* mean, acc_t<T>* rstd, acc_t<T>* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const GnWorkspace lay = workspace_layout(s, plan);
  const GnDims d = dims_of(s, plan);
  A *cm = workspace, *ca = workspace + lay.bc_pad, *cb = workspace + 2 * lay.bc_pad;
  A* partial = workspace + GnWorkspace::kFwdArrays * lay.bc_pad;

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
cudaError_t multipass_bwd(const GroupNormShape& s, const GroupNormParams& prm, const GnPlan& plan, const T* dy,
                          const T* x, const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, ParamOut dweight,
                          ParamOut dbias, GnBwdOut outs, acc_t<T>* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const GnWorkspace lay = workspace_layout(s, plan);
  const GnDims d = dims_of(s, plan);
  A *sa = lay.array(workspace, 0), *sb = lay.array(workspace, 1), *sn = lay.array(workspace, 2);
  A *k2 = lay.array(workspace, 3), *k3 = lay.array(workspace, 4);
  A *pa = lay.array(workspace, GnWorkspace::kPa), *pb = lay.array(workspace, GnWorkspace::kPb);
  A* partial = workspace + GnWorkspace::kBwdArrays * lay.bc_pad;

  const bool vec = use_vec<T>(s, {x, dy, dx});
  const BwdStatsOp<A> stats{d, prm, mean, rstd, prm.silu};
  cudaError_t err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, stats, x, dy, nullptr, partial, stream)
                        : run_traversal<T, 1>(s, plan, stats, x, dy, nullptr, partial, stream);
  if (err != cudaSuccess) return err;
  gn_bwd_finalize_kernel<A><<<static_cast<unsigned>(s.B * s.G), kFinalizeThreads, 0, stream>>>(
      d, prm, outs, partial, rstd, sa, sb, sn, k2, k3, pa, pb);
  if ((err = dweight_dbias<A>(s.B, s.C, pa, pb, dweight, dbias, stream)) != cudaSuccess) return err;
  const BwdApplyOp<A> apply{d, prm, mean, rstd, k2, k3, prm.silu};
  err = vec ? run_traversal<T, 16 / sizeof(T)>(s, plan, apply, x, dy, dx, nullptr, stream)
            : run_traversal<T, 1>(s, plan, apply, x, dy, dx, nullptr, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template cudaError_t multipass_fwd<float>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, double, const float*, float*, float*, float*, float*, cudaStream_t);
template cudaError_t multipass_fwd<__half>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, double, const __half*, __half*, float*, float*, float*, cudaStream_t);
template cudaError_t multipass_fwd<__nv_bfloat16>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, double, const __nv_bfloat16*, __nv_bfloat16*, float*, float*, float*, cudaStream_t);
template cudaError_t multipass_fwd<double>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, double, const double*, double*, double*, double*, double*, cudaStream_t);
template cudaError_t multipass_bwd<float>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, const float*, const float*, const float*, const float*, float*, ParamOut, ParamOut, GnBwdOut, float*, cudaStream_t);
template cudaError_t multipass_bwd<__half>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, const __half*, const __half*, const float*, const float*, __half*, ParamOut, ParamOut, GnBwdOut, float*, cudaStream_t);
template cudaError_t multipass_bwd<__nv_bfloat16>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, const __nv_bfloat16*, const __nv_bfloat16*, const float*, const float*, __nv_bfloat16*, ParamOut, ParamOut, GnBwdOut, float*, cudaStream_t);
template cudaError_t multipass_bwd<double>(const GroupNormShape&, const GroupNormParams&, const GnPlan&, const double*, const double*, const double*, const double*, double*, ParamOut, ParamOut, GnBwdOut, double*, cudaStream_t);
template cudaError_t dweight_dbias<float>(int64_t, int64_t, const float*, const float*, ParamOut, ParamOut, cudaStream_t);
template cudaError_t dweight_dbias<double>(int64_t, int64_t, const double*, const double*, ParamOut, ParamOut, cudaStream_t);

}  // namespace gn
}  // namespace cuda
}  // namespace dalle3_fast
