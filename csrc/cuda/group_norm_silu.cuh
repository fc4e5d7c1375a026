// GroupNorm + SiLU on CUDA, shared by its two paths (group_norm_silu_multipass.cu,
// group_norm_silu_single_pass.cu) and their launcher (group_norm_silu.cu): the per-element
// helpers, the plan and workspace of the multi-pass path, and the entry points of each path.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace gn {

constexpr int64_t kSegQuantum = 256;  // channels-first segments are multiples of 32 lanes * 8

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

// y1 = (x - m) * a + b, then SiLU: the apply step of the forward (both paths).
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

struct GnBwdOut {
  ParamOut dadd, dscale, dshift;
};

// ------------------------------------------------------------------ multi-pass plan and workspace

struct GnPlan {
  int64_t nch = 1;        // segments per row (CF) or row chunks per sample (CL)
  int64_t seg_elems = 0;  // CF
  int64_t rpc = 0;        // CL rows per chunk
};

inline GnPlan make_plan(const GroupNormShape& s) {
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
  static constexpr int kPa = 5, kPb = 6;  // the partials of dbias/dweight, which the single-pass path fills too
  int64_t bc_pad, partial;
  size_t elem;
  template <class A>
  A* array(A* workspace, int i) const {
    return workspace + i * bc_pad;
  }
  size_t bytes(bool backward) const {
    return elem * static_cast<size_t>((backward ? kBwdArrays : kFwdArrays) * bc_pad + partial * (backward ? 3 : 2));
  }
};

inline GnWorkspace workspace_layout(const GroupNormShape& s, const GnPlan& p) {
  GnWorkspace w;
  w.bc_pad = round_up(s.B * s.C, 16);
  w.partial = s.B * s.C * p.nch;
  w.elem = s.dtype == DType::kFloat64 ? 8 : 4;
  return w;
}

template <class T>
bool use_vec(const GroupNormShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if ((s.channels_last ? s.C : s.S) % V != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// ------------------------------------------------------------------ entry points of the two paths

// Multi-pass path (any layout and size): stats -> finalize -> apply. `workspace` holds
// workspace_layout(s, plan).bytes(backward) bytes.
template <class T>
cudaError_t multipass_fwd(const GroupNormShape& s, const GroupNormParams& prm, const GnPlan& plan, double eps,
                          const T* x, T* y, acc_t<T>* mean, acc_t<T>* rstd, acc_t<T>* workspace, cudaStream_t stream);
template <class T>
cudaError_t multipass_bwd(const GroupNormShape& s, const GroupNormParams& prm, const GnPlan& plan, const T* dy,
                          const T* x, const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, ParamOut dweight,
                          ParamOut dbias, GnBwdOut outs, acc_t<T>* workspace, cudaStream_t stream);

// dweight = sum_b pb, dbias = sum_b pa over (B, C) partials.
template <class A>
cudaError_t dweight_dbias(int64_t B, int64_t C, const A* pa, const A* pb, ParamOut dweight, ParamOut dbias,
                          cudaStream_t stream);

// Single-pass path (channels-first groups that fit in shared memory): one CTA per (b, g).
// Shared memory it needs for this shape, 0 when it does not apply.
size_t single_pass_smem_bytes(const GroupNormShape& s, bool backward);
template <class T>
cudaError_t single_pass_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                            acc_t<T>* mean, acc_t<T>* rstd, cudaStream_t stream);
// Writes dx and dadd/dscale/dshift, and the (B, C) partials pa, pb of dbias, dweight.
template <class T>
cudaError_t single_pass_bwd(const GroupNormShape& s, const GroupNormParams& prm, const T* dy, const T* x,
                            const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, GnBwdOut outs, acc_t<T>* pa,
                            acc_t<T>* pb, cudaStream_t stream);

}  // namespace gn
}  // namespace cuda
}  // namespace dalle3_fast
