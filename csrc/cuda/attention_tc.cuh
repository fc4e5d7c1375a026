// Tile configuration of the tensor-core (fp16/bf16) attention kernels.
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

}  // namespace cuda
}  // namespace dalle3_fast
