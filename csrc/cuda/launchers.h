// Pure CUDA launchers of the fused ops: raw pointers, sizes and a stream; no torch.
// csrc/cuda/binding.cpp binds them to the dalle3_fast operators.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace dalle3_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A (B, C) or (C,) parameter tensor of any floating dtype; ptr == nullptr means absent.
struct ParamIn {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};
struct ParamOut {
  void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

// x is (B, C, S) when channels_last is false and (B, S, C) when it is true (S = H*W or L).
// y, grad_y and dx share x's dtype and layout; mean/rstd (B, G) and the workspace are
// float32, or float64 when x is float64.
struct GroupNormShape {
  int64_t B = 0, C = 0, S = 0;
  int64_t G = 0;
  bool channels_last = false;
  DType dtype = DType::kFloat32;
};

// How a group is reduced. kAuto picks from the shape; kSinglePass has one CTA own a whole group
// (channels-first groups that fit in shared memory; others take the multi-pass path anyway);
// kMultiPass splits every group over several CTAs (stats, finalize, apply). Tests force each.
enum class GnPath : int { kAuto = 0, kSinglePass = 1, kMultiPass = 2 };

struct GroupNormParams {
  ParamIn weight, bias;       // (C,)
  ParamIn add, scale, shift;  // (B, C), each optional
  bool silu = true;
  GnPath path = GnPath::kAuto;
};

// Scratch memory (bytes) the forward/backward needs for this shape on the current device.
size_t group_norm_silu_workspace_bytes(const GroupNormShape& shape, bool backward);

cudaError_t group_norm_silu_fwd(const GroupNormShape& shape, const GroupNormParams& params, double eps,
                                const void* x, void* y, void* mean, void* rstd, void* workspace,
                                cudaStream_t stream);

// dweight, dbias (C,) and dadd, dscale, dshift (B, C) are written in their own dtypes;
// dadd/dscale/dshift are zero when the matching input is absent.
cudaError_t group_norm_silu_bwd(const GroupNormShape& shape, const GroupNormParams& params,
                                const void* grad_y, const void* x, const void* mean, const void* rstd,
                                void* dx, ParamOut dweight, ParamOut dbias, ParamOut dadd, ParamOut dscale,
                                ParamOut dshift, void* workspace, cudaStream_t stream);

// Attention, layout (B, N, H, D) for q/out and (B, L, H, D) for k/v, all contiguous and of one
// dtype; lse is (B, H, N), float32 (float64 for float64 inputs), natural log, -inf for rows
// that see no key. key_lengths: int32 (B,) on the device or nullptr (all L keys valid);
// values are clamped to [0, L].
struct AttentionShape {
  int64_t B = 0, N = 0, L = 0, H = 0, D = 0;
  DType dtype = DType::kFloat16;
};

cudaError_t attention_fwd(const AttentionShape& shape, const void* q, const void* k, const void* v,
                          const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream);

// Scratch memory (bytes) the backward needs: delta = rowsum(dO * O), (B, H, N) in the lse dtype.
size_t attention_bwd_workspace_bytes(const AttentionShape& shape);

cudaError_t attention_bwd(const AttentionShape& shape, const void* grad_out, const void* q, const void* k,
                          const void* v, const void* out, const void* lse, const int32_t* key_lengths,
                          double scale, void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace dalle3_fast
