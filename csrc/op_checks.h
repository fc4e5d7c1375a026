// Validation of the dalle3_fast operators' inputs, shared by the CPU and CUDA implementations:
// the shape, dtype and device rules of the schemas (dalle3_fast/ops/library.py). A failed check
// raises one RuntimeError naming the argument. What only one device needs (the CPU reading
// key_lengths, the CUDA grid limits) stays in that device's binding.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace dalle3_fast {

// float64 for float64 inputs, float32 for the others: statistics, lse, accumulators.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct GroupNormDims {
  int64_t B, C, S, G;
};

// x (B, C, H, W) or (B, C, L), floating and not empty; weight, bias (C,); add, scale, shift
// (B, C) when given; all floating and on x's device; num_groups divides C.
GroupNormDims check_group_norm_silu(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& bias, const std::optional<at::Tensor>& add,
                                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                    int64_t num_groups);

void check_eps(const char* op, double eps);

// None, or at least 1.
void check_splits(const char* op, std::optional<int64_t> splits);

// grad_y as x (shape, dtype, device); mean and rstd (B, G) in x's accumulation dtype.
void check_group_norm_silu_bwd(const char* op, const GroupNormDims& d, const at::Tensor& x, const at::Tensor& grad_y,
                               const at::Tensor& mean, const at::Tensor& rstd);

struct AttentionDims {
  int64_t B, N, L, H, D;
};

// q (B, N, H, D), k and v (B, L, H, D), one floating dtype, one device, nothing empty, D one of
// the supported head dims (op_limits.h); key_lengths int32 (B,) on q's device, and then
// L <= kMaxKeyTokens. Values of key_lengths are not read here (they may live on a GPU).
AttentionDims check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& key_lengths);

// grad_out and out as q (shape, dtype, device); lse (B, H, N) in q's accumulation dtype.
void check_attention_bwd(const char* op, const AttentionDims& d, const at::Tensor& q, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& lse);

}  // namespace dalle3_fast
