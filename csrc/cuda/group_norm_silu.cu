// GroupNorm (+ add, scale/shift modulation) + SiLU, forward and backward, for
// channels-first (B, C, S) and channels-last (B, S, C) tensors.
//
// Two paths, one file each:
//   group_norm_silu_single_pass.cu: channels-first tensors whose group fits in shared memory; one
//     CTA per (b, g) reads the group once and takes exact two-pass statistics there.
//   group_norm_silu_multipass.cu: everything else; stats, finalize and apply passes over chunks.
// This file holds the launchers of launchers.h: shape checks, workspace size and the choice of
// path (GroupNormParams::path forces one, for tests).
#include "group_norm_silu.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

using namespace gn;

bool use_single_pass(const GroupNormShape& s, GnPath path, bool backward) {
  const size_t bytes = single_pass_smem_bytes(s, backward);
  if (bytes == 0 || path == GnPath::kMultiPass || bytes > static_cast<size_t>(device_smem_optin())) return false;
  // One CTA per group: past ~200 KB a group takes too long for one SM to stream.
  return path == GnPath::kSinglePass || bytes <= 200 * 1024;
}

template <class T>
cudaError_t gn_fwd(const GroupNormShape& s, const GroupNormParams& prm, double eps, const T* x, T* y,
                   acc_t<T>* mean, acc_t<T>* rstd, void* workspace, cudaStream_t stream) {
  if (use_single_pass(s, prm.path, false)) return single_pass_fwd<T>(s, prm, eps, x, y, mean, rstd, stream);
  return multipass_fwd<T>(s, prm, make_plan(s), eps, x, y, mean, rstd, static_cast<acc_t<T>*>(workspace), stream);
}

template <class T>
cudaError_t gn_bwd(const GroupNormShape& s, const GroupNormParams& prm, const T* dy, const T* x, const acc_t<T>* mean,
                   const acc_t<T>* rstd, T* dx, ParamOut dweight, ParamOut dbias, GnBwdOut outs, void* workspace,
                   cudaStream_t stream) {
  using A = acc_t<T>;
  const GnPlan plan = make_plan(s);
  A* ws = static_cast<A*>(workspace);
  if (!use_single_pass(s, prm.path, true))
    return multipass_bwd<T>(s, prm, plan, dy, x, mean, rstd, dx, dweight, dbias, outs, ws, stream);
  const GnWorkspace lay = workspace_layout(s, plan);
  A *pa = lay.array(ws, GnWorkspace::kPa), *pb = lay.array(ws, GnWorkspace::kPb);
  const cudaError_t err = single_pass_bwd<T>(s, prm, dy, x, mean, rstd, dx, outs, pa, pb, stream);
  if (err != cudaSuccess) return err;
  return dweight_dbias<A>(s.B, s.C, pa, pb, dweight, dbias, stream);
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
