// CUDA implementations of the dalle3_fast operators (schemas in dalle3_fast/ops/library.py):
// validate the inputs (csrc/op_checks.h, plus the CUDA-only limits here), allocate outputs and
// scratch with torch, run the launchers of launchers.h on the current stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../op_checks.h"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": `", name, "` has dtype ", t.scalar_type(),
                  "; expected float16, bfloat16, float32 or float64");
  }
}

// The shared checks put every input on the device of x / q; this one makes that a CUDA device.
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got one on ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Contiguous and 16-byte aligned, as the vectorised loads want.
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// `result` with the strides empty_like(like) has, as the fake implementations promise.
at::Tensor like_layout(const at::Tensor& result, const at::Tensor& like) {
  if (result.strides() == like.strides()) return result;
  at::Tensor r = at::empty_like(like);
  if (r.strides() == result.strides()) return result;
  return r.copy_(result);
}

at::ScalarType stats_dtype(const at::Tensor& x) { return acc_type(x.scalar_type()); }

// ------------------------------------------------------------------ GroupNorm + SiLU

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x as a dense tensor the kernels can walk: contiguous (B, C, S) or channels-last (B, S, C).
at::Tensor gn_dense_input(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last(x)) return x;
  return x.contiguous();
}

struct GnSetup {
  GroupNormShape shape;
  GroupNormParams params;
  at::Tensor weight, bias, add, scale, shift;  // kept alive for the launch
};

ParamIn param_in(const at::Tensor& t, const char* op, const char* name) {
  if (!t.defined()) return ParamIn{};
  return ParamIn{t.data_ptr(), dtype_of(t, op, name)};
}

ParamOut param_out(const at::Tensor& t, const char* op, const char* name) {
  return ParamOut{t.data_ptr(), dtype_of(t, op, name)};
}

GnSetup gn_setup(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                 const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& shift, int64_t num_groups, bool silu, std::optional<int64_t> splits) {
  const GroupNormDims d = check_group_norm_silu(op, x, weight, bias, add, scale, shift, num_groups);
  check_splits(op, splits);
  check_cuda(x, op, "x");
  GnSetup s;
  const int64_t B = d.B, C = d.C;
  TORCH_CHECK(B <= 65535, op, ": batch ", B, " is larger than the CUDA kernels' limit of 65535; split the batch");
  s.shape.B = B;
  s.shape.C = C;
  s.shape.S = x.numel() / (B * C);
  s.shape.G = num_groups;
  s.shape.channels_last = is_channels_last(x);
  s.shape.dtype = dtype_of(x, op, "x");
  s.weight = weight.contiguous();
  s.bias = bias.contiguous();
  const std::optional<at::Tensor>* per_sample[3] = {&add, &scale, &shift};
  at::Tensor* kept[3] = {&s.add, &s.scale, &s.shift};
  for (int i = 0; i < 3; ++i) {
    if (per_sample[i]->has_value()) *kept[i] = (*per_sample[i])->contiguous();
  }
  s.params.weight = param_in(s.weight, op, "weight");
  s.params.bias = param_in(s.bias, op, "bias");
  s.params.add = param_in(s.add, op, "add");
  s.params.scale = param_in(s.scale, op, "scale");
  s.params.shift = param_in(s.shift, op, "shift");
  s.params.silu = silu;
  s.params.path = !splits.has_value() ? GnPath::kAuto : *splits == 1 ? GnPath::kSinglePass : GnPath::kMultiPass;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_op(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu, std::optional<int64_t> splits) {
  const char* op = "group_norm_silu_fwd";
  check_eps(op, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = gn_dense_input(x_in);
  const GnSetup s = gn_setup(op, x, weight, bias, add, scale, shift, num_groups, silu, splits);
  at::Tensor y = at::empty_like(x);  // same strides: same memory format
  at::Tensor mean = at::empty({s.shape.B, num_groups}, x.options().dtype(stats_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor ws = at::empty({static_cast<int64_t>(group_norm_silu_workspace_bytes(s.shape, false))},
                            x.options().dtype(at::kByte));
  check_launch(cuda::group_norm_silu_fwd(s.shape, s.params, eps, x.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                         rstd.data_ptr(), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               op);
  return {like_layout(y, x_in), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_op(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t num_groups,
    bool silu, std::optional<int64_t> splits) {
  const char* op = "group_norm_silu_bwd";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = gn_dense_input(x_in);
  const GnSetup s = gn_setup(op, x, weight, bias, add, scale, shift, num_groups, silu, splits);
  check_group_norm_silu_bwd(op, GroupNormDims{s.shape.B, s.shape.C, s.shape.S, s.shape.G}, x, grad_y_in, mean_in,
                            rstd_in);
  const at::Tensor grad_y = grad_y_in.contiguous(s.shape.channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous);
  const int64_t B = s.shape.B, C = s.shape.C;
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(s.weight), dbias = at::empty_like(s.bias);
  at::Tensor dadd = at::empty({B, C}, x.options()), dscale = at::empty_like(dadd), dshift = at::empty_like(dadd);
  at::Tensor ws = at::empty({static_cast<int64_t>(group_norm_silu_workspace_bytes(s.shape, true))},
                            x.options().dtype(at::kByte));
  check_launch(cuda::group_norm_silu_bwd(s.shape, s.params, grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(),
                                         rstd.data_ptr(), dx.data_ptr(), param_out(dweight, op, "weight"),
                                         param_out(dbias, op, "bias"), param_out(dadd, op, "x"),
                                         param_out(dscale, op, "x"), param_out(dshift, op, "x"), ws.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()),
               op);
  return {like_layout(dx, x_in), like_layout(dweight, weight), like_layout(dbias, bias), dadd, dscale, dshift};
}

// ------------------------------------------------------------------ attention

struct AttnInputs {
  AttentionShape shape;
  at::Tensor q, k, v;
  const int32_t* key_lengths = nullptr;
  at::Tensor key_lengths_keep;
};

AttnInputs attn_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_lengths) {
  const AttentionDims d = check_attention(op, q, k, v, key_lengths);
  check_cuda(q, op, "q");
  AttnInputs in;
  in.shape.dtype = dtype_of(q, op, "q");
  in.shape.B = d.B;
  in.shape.N = d.N;
  in.shape.H = d.H;
  in.shape.D = d.D;
  in.shape.L = d.L;
  TORCH_CHECK(d.B <= 65535 && d.H <= 65535, op, ": B and H must be at most 65535, got ", d.B, " and ", d.H);
  TORCH_CHECK(d.B * std::max(d.N, d.L) * d.H < (int64_t(1) << 31), op,
              ": B * max(N, L) * H must stay below 2^31 rows; split the batch");
  if (key_lengths.has_value()) {
    // Values are clamped to [0, L] by the kernels: reading them here would sync the stream.
    in.key_lengths_keep = key_lengths->contiguous();
    in.key_lengths = in.key_lengths_keep.data_ptr<int32_t>();
  }
  in.q = dense_aligned(q);
  in.k = dense_aligned(k);
  in.v = dense_aligned(v);
  return in;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_lengths, double scale) {
  const char* op = "attention_fwd";
  const c10::cuda::CUDAGuard guard(q.device());
  const AttnInputs in = attn_inputs(op, q, k, v, key_lengths);
  at::Tensor out = at::empty_like(in.q);
  at::Tensor lse = at::empty({in.shape.B, in.shape.H, in.shape.N}, in.q.options().dtype(stats_dtype(in.q)));
  check_launch(cuda::attention_fwd(in.shape, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), in.key_lengths,
                                   scale, out.data_ptr(), lse.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               op);
  return {like_layout(out, q), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_op(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& key_lengths,
                                                             double scale) {
  const char* op = "attention_bwd";
  const c10::cuda::CUDAGuard guard(q.device());
  const AttnInputs in = attn_inputs(op, q, k, v, key_lengths);
  check_attention_bwd(op, AttentionDims{in.shape.B, in.shape.N, in.shape.L, in.shape.H, in.shape.D}, q, grad_out, out,
                      lse);
  const at::Tensor g = dense_aligned(grad_out), o = dense_aligned(out), l = lse.contiguous();
  at::Tensor dq = at::empty_like(in.q), dk = at::empty_like(in.k), dv = at::empty_like(in.v);
  at::Tensor ws = at::empty({static_cast<int64_t>(attention_bwd_workspace_bytes(in.shape))},
                            in.q.options().dtype(at::kByte));
  check_launch(cuda::attention_bwd(in.shape, g.data_ptr(), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(),
                                   o.data_ptr(), l.data_ptr(), in.key_lengths, scale,
                                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ws.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               op);
  return {like_layout(dq, q), like_layout(dk, k), like_layout(dv, v)};
}

}  // namespace
}  // namespace cuda
}  // namespace dalle3_fast

TORCH_LIBRARY_IMPL(dalle3_fast, CUDA, m) {
  m.impl("group_norm_silu_fwd", &dalle3_fast::cuda::group_norm_silu_fwd_op);
  m.impl("group_norm_silu_bwd", &dalle3_fast::cuda::group_norm_silu_bwd_op);
  m.impl("attention_fwd", &dalle3_fast::cuda::attention_fwd_op);
  m.impl("attention_bwd", &dalle3_fast::cuda::attention_bwd_op);
}
