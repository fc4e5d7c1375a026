// Attention backward without atomics, in three kernels:
//   delta = rowsum(dO * O) (fp32, (B, H, N));
//   dq:   a CTA holds 64 queries and streams the key tiles: S = Q K^T, P = exp(S - lse),
//         dP = dO V^T, dS = P (dP - delta), dQ += dS K;
//   dk/dv: a CTA holds 64 keys and streams the query tiles: S^T = K Q^T, P^T, dV += P^T dO,
//         dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
// Recomputing S and dP in both kernels costs 7 matrix products instead of flash-attention-2's 5,
// and buys deterministic results with every output written exactly once.
//
// This file: the delta kernel and the launcher of launchers.h. The dq and dk/dv kernels of
// fp16/bf16 are in attention_bwd_kernel.cuh, instantiated per (dtype, head dim) under
// instantiations/; fp32/fp64 run attention_simple.cu.
#include "../op_limits.h"
#include "attention.h"
#include "common.cuh"
#include "launchers.h"

namespace dalle3_fast {
namespace cuda {
namespace {

// ------------------------------------------------------------------ delta = rowsum(dO * O)

template <class T>
__global__ void __launch_bounds__(256)
attn_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, acc_t<T>* __restrict__ delta, int rows,
                  int N, int H, int D) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps
  const T* a = dout + static_cast<int64_t>(row) * D;
  const T* o = out + static_cast<int64_t>(row) * D;
  A sum = A(0);
  for (int c = lane * V; c < D; c += 32 * V) {
    const Vec<T, V> x = load_vec<T, V>(a + c), y = load_vec<T, V>(o + c);
#pragma unroll
    for (int j = 0; j < V; ++j) sum += to_acc<A>(x.v[j]) * to_acc<A>(y.v[j]);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    const int b = row / (N * H), rem = row - b * N * H, n = rem / H, h = rem - n * H;
    delta[(static_cast<int64_t>(b) * H + h) * N + n] = sum;
  }
}

template <class T>
cudaError_t launch_delta(const AttentionShape& s, const void* dout, const void* out, void* delta,
                         cudaStream_t stream) {
  const int rows = static_cast<int>(s.B * s.N * s.H);
  attn_delta_kernel<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(out), static_cast<acc_t<T>*>(delta), rows,
      static_cast<int>(s.N), static_cast<int>(s.H), static_cast<int>(s.D));
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_tc(const AttentionShape& s, const void* dout, const void* q, const void* k, const void* v,
                   const void* lse, const void* delta, const int32_t* kl, double scale, void* dq, void* dk, void* dv,
                   cudaStream_t stream) {
  const float *l = static_cast<const float*>(lse), *dl = static_cast<const float*>(delta);
  switch (s.D) {
#define D3F_CASE(D) \
  case D:           \
    return attention_bwd_tc<T, D>(s, dout, q, k, v, l, dl, kl, scale, dq, dk, dv, stream);
    D3F_FOR_EACH_HEAD_DIM(D3F_CASE)
#undef D3F_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t attention_bwd_workspace_bytes(const AttentionShape& s) {
  return static_cast<size_t>(s.B * s.H * s.N) * (s.dtype == DType::kFloat64 ? 8 : 4);
}

cudaError_t attention_bwd(const AttentionShape& s, const void* grad_out, const void* q, const void* k,
                          const void* v, const void* out, const void* lse, const int32_t* key_lengths, double scale,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream) {
  if (!attention_shape_ok(s)) return cudaErrorInvalidValue;
  cudaError_t err;
  switch (s.dtype) {
    case DType::kFloat16:
      if ((err = launch_delta<__half>(s, grad_out, out, workspace, stream)) != cudaSuccess) return err;
      return bwd_tc<__half>(s, grad_out, q, k, v, lse, workspace, key_lengths, scale, dq, dk, dv, stream);
    case DType::kBFloat16:
      if ((err = launch_delta<__nv_bfloat16>(s, grad_out, out, workspace, stream)) != cudaSuccess) return err;
      return bwd_tc<__nv_bfloat16>(s, grad_out, q, k, v, lse, workspace, key_lengths, scale, dq, dk, dv, stream);
    case DType::kFloat32:
      if ((err = launch_delta<float>(s, grad_out, out, workspace, stream)) != cudaSuccess) return err;
      return attention_simple_bwd(s, grad_out, q, k, v, lse, workspace, key_lengths, scale, dq, dk, dv, stream);
    case DType::kFloat64:
      if ((err = launch_delta<double>(s, grad_out, out, workspace, stream)) != cudaSuccess) return err;
      return attention_simple_bwd(s, grad_out, q, k, v, lse, workspace, key_lengths, scale, dq, dk, dv, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dalle3_fast
