// Entry points shared by the attention compile units: attention_fwd.cu and attention_bwd.cu
// dispatch on dtype and head dim to the tensor-core kernels instantiated one (dtype, head dim)
// per file under instantiations/, or to the fp32/fp64 kernels of attention_simple.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "launchers.h"

namespace dalle3_fast {
namespace cuda {

// Sizes the kernels index with 32-bit integers and grid dimensions (attention_fwd.cu).
bool attention_shape_ok(const AttentionShape& s);

// fp16/bf16 (T = __half, __nv_bfloat16), head dim D: attention_fwd_kernel.cuh, attention_bwd_kernel.cuh.
template <class T, int D>
cudaError_t attention_fwd_tc(const AttentionShape& s, const void* q, const void* k, const void* v,
                             const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream);
// dq and dk/dv kernels; delta = rowsum(dO * O) is computed before (attention_bwd.cu).
template <class T, int D>
cudaError_t attention_bwd_tc(const AttentionShape& s, const void* dout, const void* q, const void* k, const void* v,
                             const float* lse, const float* delta, const int32_t* key_lengths, double scale, void* dq,
                             void* dk, void* dv, cudaStream_t stream);

// fp32/fp64 (attention_simple.cu).
cudaError_t attention_simple_fwd(const AttentionShape& s, const void* q, const void* k, const void* v,
                                 const int32_t* key_lengths, double scale, void* out, void* lse, cudaStream_t stream);
cudaError_t attention_simple_bwd(const AttentionShape& s, const void* dout, const void* q, const void* k,
                                 const void* v, const void* lse, const void* delta, const int32_t* key_lengths,
                                 double scale, void* dq, void* dk, void* dv, cudaStream_t stream);

}  // namespace cuda
}  // namespace dalle3_fast
