// CUDA implementations of the dalle3_fast_C operators (schemas in csrc/ops.cpp): check the
// inputs, allocate outputs and scratch with torch, run the launchers of launchers.h on the
// current stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

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

void check_device(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": `", name, "` is on ", t.device(), " but the first input is on ",
              first.device(), "; move all inputs to one device");
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` has shape ", t.sizes(), "; expected ", shape);
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

at::ScalarType stats_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

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
                 const std::optional<at::Tensor>& shift, int64_t num_groups, bool silu) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, op, ": `x` must be (B, C, H, W) or (B, C, L), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": `x` is empty (shape ", x.sizes(), ")");
  check_device(x, x, op, "x");
  GnSetup s;
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": channels (", C, ") are not divisible by `num_groups` (",
              num_groups, "); pick a divisor of ", C);
  TORCH_CHECK(B <= 65535, op, ": batch ", B, " is larger than the CUDA kernels' limit of 65535; split the batch");
  s.shape.B = B;
  s.shape.C = C;
  s.shape.S = x.numel() / (B * C);
  s.shape.G = num_groups;
  s.shape.channels_last = is_channels_last(x);
  s.shape.dtype = dtype_of(x, op, "x");
  check_device(weight, x, op, "weight");
  check_device(bias, x, op, "bias");
  check_shape(weight, {C}, op, "weight");
  check_shape(bias, {C}, op, "bias");
  s.weight = weight.contiguous();
  s.bias = bias.contiguous();
  const std::optional<at::Tensor>* per_sample[3] = {&add, &scale, &shift};
  at::Tensor* kept[3] = {&s.add, &s.scale, &s.shift};
  const char* names[3] = {"add", "scale", "shift"};
  for (int i = 0; i < 3; ++i) {
    if (per_sample[i]->has_value() && (*per_sample[i])->defined()) {
      const at::Tensor& t = **per_sample[i];
      check_device(t, x, op, names[i]);
      check_shape(t, {B, C}, op, names[i]);
      *kept[i] = t.contiguous();
    }
  }
  s.params.weight = param_in(s.weight, op, "weight");
  s.params.bias = param_in(s.bias, op, "bias");
  s.params.add = param_in(s.add, op, "add");
  s.params.scale = param_in(s.scale, op, "scale");
  s.params.shift = param_in(s.shift, op, "shift");
  s.params.silu = silu;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_op(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu) {
  const char* op = "group_norm_silu_fwd";
  TORCH_CHECK(eps > 0, op, ": `eps` must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = gn_dense_input(x_in);
  const GnSetup s = gn_setup(op, x, weight, bias, add, scale, shift, num_groups, silu);
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
    bool silu) {
  const char* op = "group_norm_silu_bwd";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = gn_dense_input(x_in);
  const GnSetup s = gn_setup(op, x, weight, bias, add, scale, shift, num_groups, silu);
  check_device(grad_y_in, x, op, "grad_y");
  check_shape(grad_y_in, x.sizes(), op, "grad_y");
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), op, ": `grad_y` has dtype ", grad_y_in.scalar_type(),
              " but `x` has ", x.scalar_type());
  const at::Tensor grad_y = grad_y_in.contiguous(s.shape.channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous);
  const int64_t B = s.shape.B, C = s.shape.C;
  for (const auto* t : {&mean_in, &rstd_in}) {
    const char* name = t == &mean_in ? "mean" : "rstd";
    check_device(*t, x, op, name);
    check_shape(*t, {B, num_groups}, op, name);
    TORCH_CHECK(t->scalar_type() == stats_dtype(x), op, ": `", name, "` has dtype ", t->scalar_type(), "; expected ",
                stats_dtype(x));
  }
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
  AttnInputs in;
  TORCH_CHECK(q.dim() == 4, op, ": `q` must be (B, N, H, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": `k` must be (B, L, H, D), got shape ", k.sizes());
  check_device(q, q, op, "q");
  check_device(k, q, op, "k");
  check_device(v, q, op, "v");
  in.shape.dtype = dtype_of(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": `q`, `k`, `v` must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  in.shape.B = q.size(0);
  in.shape.N = q.size(1);
  in.shape.H = q.size(2);
  in.shape.D = q.size(3);
  in.shape.L = k.size(1);
  TORCH_CHECK(attention_head_dim_supported(in.shape.D), op, ": head dim D=", in.shape.D,
              " is not supported; use one of 32, 40, 64, 80, 96, 128, 160");
  TORCH_CHECK(k.size(0) == in.shape.B && k.size(2) == in.shape.H && k.size(3) == in.shape.D, op, ": `k` has shape ",
              k.sizes(), "; expected (B=", in.shape.B, ", L, H=", in.shape.H, ", D=", in.shape.D, ")");
  check_shape(v, k.sizes(), op, "v");
  TORCH_CHECK(in.shape.N > 0 && in.shape.L > 0, op, ": empty sequence: `q` ", q.sizes(), ", `k` ", k.sizes());
  TORCH_CHECK(in.shape.B <= 65535 && in.shape.H <= 65535, op, ": B and H must be at most 65535, got ", in.shape.B,
              " and ", in.shape.H);
  TORCH_CHECK(in.shape.B * std::max(in.shape.N, in.shape.L) * in.shape.H < (int64_t(1) << 31), op,
              ": B * max(N, L) * H must stay below 2^31 rows; split the batch");
  if (key_lengths.has_value() && key_lengths->defined()) {
    const at::Tensor& kl = *key_lengths;
    check_device(kl, q, op, "key_lengths");
    TORCH_CHECK(kl.scalar_type() == at::kInt, op, ": `key_lengths` must be int32, got ", kl.scalar_type());
    check_shape(kl, {in.shape.B}, op, "key_lengths");
    in.key_lengths_keep = kl.contiguous();
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
  for (const auto* t : {&grad_out, &out}) {
    const char* name = t == &grad_out ? "grad_out" : "out";
    check_device(*t, q, op, name);
    check_shape(*t, q.sizes(), op, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": `", name, "` has dtype ", t->scalar_type(),
                " but `q` has ", q.scalar_type());
  }
  check_device(lse, q, op, "lse");
  check_shape(lse, {in.shape.B, in.shape.H, in.shape.N}, op, "lse");
  TORCH_CHECK(lse.scalar_type() == stats_dtype(q), op, ": `lse` has dtype ", lse.scalar_type(), "; expected ",
              stats_dtype(q));
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

TORCH_LIBRARY_IMPL(dalle3_fast_C, CUDA, m) {
  m.impl("group_norm_silu_fwd", &dalle3_fast::cuda::group_norm_silu_fwd_op);
  m.impl("group_norm_silu_bwd", &dalle3_fast::cuda::group_norm_silu_bwd_op);
  m.impl("attention_fwd", &dalle3_fast::cuda::attention_fwd_op);
  m.impl("attention_bwd", &dalle3_fast::cuda::attention_bwd_op);
}
