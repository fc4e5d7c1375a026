// Limits of the fused ops: the one place they are written. dalle3_fast._C exports them to
// Python (SUPPORTED_HEAD_DIMS, MAX_KEY_TOKENS); dalle3_fast.ops reads them from there.
// Host-only: no torch, no CUDA, so the .cu files include it too.
#pragma once

#include <cstdint>

// The head dims the attention kernels are compiled for. X(D) is applied to each; adding one
// needs its CUDA instantiations (csrc/cuda/instantiations/generate.py writes them).
#define D3F_FOR_EACH_HEAD_DIM(X) X(32) X(40) X(64) X(80) X(96) X(128) X(160)

namespace dalle3_fast {

#define D3F_HEAD_DIM_ENTRY(D) D,
inline constexpr int kHeadDims[] = {D3F_FOR_EACH_HEAD_DIM(D3F_HEAD_DIM_ENTRY)};
#undef D3F_HEAD_DIM_ENTRY

// Most keys cross-attention takes (T5 tokens).
inline constexpr int64_t kMaxKeyTokens = 512;

constexpr bool head_dim_supported(int64_t D) {
  for (const int d : kHeadDims)
    if (d == D) return true;
  return false;
}

}  // namespace dalle3_fast
