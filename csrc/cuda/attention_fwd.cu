// Attention forward: the launcher of launchers.h. fp16/bf16 run the flash-attention-2 style
// tensor-core kernel of attention_fwd_kernel.cuh, instantiated per (dtype, head dim) under
// instantiations/; fp32/fp64 run attention_simple.cu.
#include "../op_limits.h"
#include "attention.h"
#include "common.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

template <class T>
cudaError_t fwd_tc(const AttentionShape& s, const void* q, const void* k, const void* v, const int32_t* kl,
                   double scale, void* out, void* lse, cudaStream_t stream) {
  switch (s.D) {
#define D3F_CASE(D) \
  case D:           \
    return attention_fwd_tc<T, D>(s, q, k, v, kl, scale, out, lse, stream);
    D3F_FOR_EACH_HEAD_DIM(D3F_CASE)
#undef D3F_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_shape_ok(const AttentionShape& s) {
  return s.B > 0 && s.N > 0 && s.L > 0 && s.H > 0 && head_dim_supported(s.D) && s.B <= 65535 &&
         s.H <= 65535 && s.N < (int64_t(1) << 31) && s.L < (int64_t(1) << 31) &&
         s.B * s.N * s.H < (int64_t(1) << 31) && s.B * s.L * s.H < (int64_t(1) << 31);
}

cudaError_t attention_fwd(const AttentionShape& s, const void* q, const void* k, const void* v,
                          const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream) {
  if (!attention_shape_ok(s)) return cudaErrorInvalidValue;
  switch (s.dtype) {
    case DType::kFloat16:
      return fwd_tc<__half>(s, q, k, v, key_lengths, scale, out, lse, stream);
    case DType::kBFloat16:
      return fwd_tc<__nv_bfloat16>(s, q, k, v, key_lengths, scale, out, lse, stream);
    default:
      return attention_simple_fwd(s, q, k, v, key_lengths, scale, out, lse, stream);
  }
}

}  // namespace cuda
}  // namespace dalle3_fast
