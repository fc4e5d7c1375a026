#include "op_checks.h"

#include <c10/util/Exception.h>

#include "op_limits.h"

namespace dalle3_fast {
namespace {

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& first,
                       const char* first_name) {
  TORCH_CHECK(t.device() == first.device(), op, ": `", name, "` is on ", t.device(), " but `", first_name, "` is on ",
              first.device(), "; move all inputs to one device");
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": `", name, "` has dtype ", t.scalar_type(),
              "; expected float16, bfloat16, float32 or float64");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` has shape ", t.sizes(), "; expected ", shape);
}

// t has the shape, dtype and device of `like`.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like, const char* like_name) {
  check_same_device(op, name, t, like, like_name);
  check_shape(op, name, t, like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(), " but `",
              like_name, "` has ", like.scalar_type());
}

void check_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                 at::IntArrayRef shape) {
  check_same_device(op, name, t, like, "x");
  check_shape(op, name, t, shape);
  TORCH_CHECK(t.scalar_type() == acc_type(like.scalar_type()), op, ": `", name, "` has dtype ", t.scalar_type(),
              "; expected ", acc_type(like.scalar_type()));
}

}  // namespace

GroupNormDims check_group_norm_silu(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& bias, const std::optional<at::Tensor>& add,
                                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                    int64_t num_groups) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, op, ": `x` must be (B, C, H, W) or (B, C, L), got shape ", x.sizes());
  check_floating(op, "x", x);
  TORCH_CHECK(x.numel() > 0, op, ": `x` is empty (shape ", x.sizes(), ")");
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": channels (", C, ") are not divisible by `num_groups` (",
              num_groups, "); pick a divisor of ", C);
  auto check_param = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_same_device(op, name, t, x, "x");
    check_floating(op, name, t);
    check_shape(op, name, t, shape);
  };
  check_param("weight", weight, {C});
  check_param("bias", bias, {C});
  if (add.has_value()) check_param("add", *add, {B, C});
  if (scale.has_value()) check_param("scale", *scale, {B, C});
  if (shift.has_value()) check_param("shift", *shift, {B, C});
  return GroupNormDims{B, C, x.numel() / (B * C), num_groups};
}

void check_eps(const char* op, double eps) { TORCH_CHECK(eps > 0, op, ": `eps` must be > 0, got ", eps); }

void check_splits(const char* op, std::optional<int64_t> splits) {
  TORCH_CHECK(!splits.has_value() || *splits >= 1, op, ": `splits` must be None or >= 1, got ", splits.value_or(0));
}

void check_group_norm_silu_bwd(const char* op, const GroupNormDims& d, const at::Tensor& x, const at::Tensor& grad_y,
                               const at::Tensor& mean, const at::Tensor& rstd) {
  check_like(op, "grad_y", grad_y, x, "x");
  check_stats(op, "mean", mean, x, {d.B, d.G});
  check_stats(op, "rstd", rstd, x, {d.B, d.G});
}

AttentionDims check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& key_lengths) {
  TORCH_CHECK(q.dim() == 4, op, ": `q` must be (B, N, H, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": `k` must be (B, L, H, D), got shape ", k.sizes());
  check_floating(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    check_same_device(op, name, *t, q, "q");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": `", name, "` has dtype ", t->scalar_type(), " but `q` has ",
                q.scalar_type());
  }
  const AttentionDims d{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(head_dim_supported(d.D), op, ": head dim D=", d.D, " of `q` is not supported; use one of ",
              at::IntArrayRef(std::vector<int64_t>(std::begin(kHeadDims), std::end(kHeadDims))));
  TORCH_CHECK(k.size(0) == d.B && k.size(2) == d.H && k.size(3) == d.D, op, ": `k` has shape ", k.sizes(),
              "; expected (B=", d.B, ", L, H=", d.H, ", D=", d.D, ") to match `q` ", q.sizes());
  check_shape(op, "v", v, k.sizes());
  TORCH_CHECK(d.B > 0 && d.N > 0 && d.L > 0 && d.H > 0, op, ": empty input: `q` ", q.sizes(), ", `k` ", k.sizes());
  if (key_lengths.has_value()) {
    const at::Tensor& kl = *key_lengths;
    check_same_device(op, "key_lengths", kl, q, "q");
    TORCH_CHECK(kl.scalar_type() == at::kInt, op, ": `key_lengths` has dtype ", kl.scalar_type(), "; expected int32");
    check_shape(op, "key_lengths", kl, {d.B});
    TORCH_CHECK(d.L <= kMaxKeyTokens, op, ": `k` has L=", d.L, " tokens; key_lengths (cross-attention) allows at most ",
                kMaxKeyTokens);
  }
  return d;
}

void check_attention_bwd(const char* op, const AttentionDims& d, const at::Tensor& q, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& lse) {
  check_like(op, "grad_out", grad_out, q, "q");
  check_like(op, "out", out, q, "q");
  check_same_device(op, "lse", lse, q, "q");
  check_shape(op, "lse", lse, {d.B, d.H, d.N});
  TORCH_CHECK(lse.scalar_type() == acc_type(q.scalar_type()), op, ": `lse` has dtype ", lse.scalar_type(),
              "; expected ", acc_type(q.scalar_type()));
}

}  // namespace dalle3_fast
