// GroupNorm + SiLU, single-pass path for channels-first groups that fit in shared memory: one
// CTA per (b, g) reads the group once into shared memory, takes exact two-pass statistics there
// and writes y (backward: dx, dadd/dscale/dshift, and per-channel partials of dweight/dbias) from it.
#include "group_norm_silu.cuh"

namespace dalle3_fast {
namespace cuda {
namespace gn {
namespace {

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

template <class T, int VEC>
cudaError_t launch_fused_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                             acc_t<T>* mean, acc_t<T>* rstd, cudaStream_t stream) {
  const size_t smem = single_pass_smem_bytes(s, false);
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
  const size_t smem = single_pass_smem_bytes(s, true);
  cudaError_t err = allow_smem(gn_fused_bwd_kernel<T, VEC>, smem);
  if (err != cudaSuccess) return err;
  const GnDims d{s.B, s.C, s.S, s.G, 1, false};
  gn_fused_bwd_kernel<T, VEC><<<static_cast<unsigned>(s.B * s.G), kFusedThreads, smem, stream>>>(
      d, prm, outs, dy, x, mean, rstd, dx, pa, pb);
  return cudaGetLastError();
}

}  // namespace

size_t single_pass_smem_bytes(const GroupNormShape& s, bool backward) {
  if (s.channels_last) return 0;
  const size_t elem = dtype_size(s.dtype), acc = s.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t Cg = s.C / s.G;
  const size_t coef = ((backward ? kFusedBwdCoefs : kFusedFwdCoefs) * Cg + 32) * acc;
  return (coef + 15) / 16 * 16 + (backward ? 2 : 1) * static_cast<size_t>(Cg * s.S) * elem;
}

template <class T>
cudaError_t single_pass_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                            acc_t<T>* mean, acc_t<T>* rstd, cudaStream_t stream) {
  return use_vec<T>(s, {x, y}) ? launch_fused_fwd<T, 16 / sizeof(T)>(s, prm, eps, x, y, mean, rstd, stream)
                               : launch_fused_fwd<T, 1>(s, prm, eps, x, y, mean, rstd, stream);
}

template <class T>
cudaError_t single_pass_bwd(const GroupNormShape& s, const GroupNormParams& prm, const T* dy, const T* x,
                            const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, GnBwdOut outs, acc_t<T>* pa,
                            acc_t<T>* pb, cudaStream_t stream) {
  return use_vec<T>(s, {x, dy, dx})
             ? launch_fused_bwd<T, 16 / sizeof(T)>(s, prm, dy, x, mean, rstd, dx, outs, pa, pb, stream)
             : launch_fused_bwd<T, 1>(s, prm, dy, x, mean, rstd, dx, outs, pa, pb, stream);
}

template cudaError_t single_pass_fwd<float>(const GroupNormShape&, const GroupNormParams&, double, const float*, float*, float*, float*, cudaStream_t);
template cudaError_t single_pass_fwd<__half>(const GroupNormShape&, const GroupNormParams&, double, const __half*, __half*, float*, float*, cudaStream_t);
template cudaError_t single_pass_fwd<__nv_bfloat16>(const GroupNormShape&, const GroupNormParams&, double, const __nv_bfloat16*, __nv_bfloat16*, float*, float*, cudaStream_t);
template cudaError_t single_pass_fwd<double>(const GroupNormShape&, const GroupNormParams&, double, const double*, double*, double*, double*, cudaStream_t);
template cudaError_t single_pass_bwd<float>(const GroupNormShape&, const GroupNormParams&, const float*, const float*, const float*, const float*, float*, GnBwdOut, float*, float*, cudaStream_t);
template cudaError_t single_pass_bwd<__half>(const GroupNormShape&, const GroupNormParams&, const __half*, const __half*, const float*, const float*, __half*, GnBwdOut, float*, float*, cudaStream_t);
template cudaError_t single_pass_bwd<__nv_bfloat16>(const GroupNormShape&, const GroupNormParams&, const __nv_bfloat16*, const __nv_bfloat16*, const float*, const float*, __nv_bfloat16*, GnBwdOut, float*, float*, cudaStream_t);
template cudaError_t single_pass_bwd<double>(const GroupNormShape&, const GroupNormParams&, const double*, const double*, const double*, const double*, double*, GnBwdOut, double*, double*, cudaStream_t);

}  // namespace gn
}  // namespace cuda
}  // namespace dalle3_fast
