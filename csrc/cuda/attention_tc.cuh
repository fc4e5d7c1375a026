// Tile configuration and dispatch of the tensor-core (fp16/bf16) attention kernels.
#pragma once

#include <cuda_runtime.h>

#include "launchers.h"

namespace dalle3_fast {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One CTA = 4 warps; each warp owns 16 rows of the CTA's 64-row block (queries in the forward
// and dq kernels, keys in the dk/dv kernel).
template <int D>
struct AttnCfg {
  static constexpr int kD = D;
  static constexpr int kDP = (D + 15) / 16 * 16;  // head dim padded with zeros to the MMA k
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlock = 16 * kWarps;  // rows owned by the CTA
  static constexpr int kBN = 64;               // keys per step of the forward / dq kernels
  static constexpr int kBQ = kDP <= 64 ? 64 : 32;  // queries per step of the dk/dv kernel
};

// Calls f.template operator()<D>() for the runtime head dim; false if D is unsupported.
template <class F>
bool dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f.template operator()<32>(); return true;
    case 40: f.template operator()<40>(); return true;
    case 64: f.template operator()<64>(); return true;
    case 80: f.template operator()<80>(); return true;
    case 96: f.template operator()<96>(); return true;
    case 128: f.template operator()<128>(); return true;
    case 160: f.template operator()<160>(); return true;
    default: return false;
  }
}

// Launchers of the fp32/fp64 path (attention_simple.cu).
cudaError_t attention_simple_fwd(const AttentionShape& s, const void* q, const void* k, const void* v,
                                 const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream);
cudaError_t attention_simple_bwd(const AttentionShape& s, const void* dout, const void* q, const void* k,
                                 const void* v, const void* lse, const void* delta, const int32_t* key_lengths,
                                 double scale, void* dq, void* dk, void* dv, cudaStream_t stream);

}  // namespace cuda
}  // namespace dalle3_fast
