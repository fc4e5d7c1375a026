// CPU kernels of dalle3_fast::attention_fwd / _bwd (flash-attention style).
//
// Layout (B, N, H, D) like flash-attn; keys and values (B, L, H, D). With key_lengths,
// keys at or past key_lengths[b] are skipped (never computed); a sample with no keys
// gets zeros and lse = -inf. Forward: one task per (b, h, block of queries), online
// softmax over key tiles, so the score matrix never exceeds one tile. Backward
// recomputes the probabilities from lse (delta = rowsum(dO * O)), one task per (b, h),
// accumulating dK and dV in place. Tile products are BLAS calls on strided views of
// the inputs; score tiles are kept transposed (keys x queries) so the softmax loops
// reduce down columns, vectorised across queries (attention_loops.h).
// float32 and float64 run natively; float16/bfloat16 run in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../op_checks.h"
#include "attention_loops.h"
#include "blas.h"
#include "parallel.h"

namespace d3f::attn {
namespace {

#define D3F_ATTN_ENTRY_POINTS(T)                                                                               \
  D3F_CLONES void k_online_softmax_tile(T* st, int64_t ld, int64_t keys, int64_t queries, T* m, T* l,         \
                                        T* alpha) {                                                            \
    online_softmax_tile<T>(st, ld, keys, queries, m, l, alpha);                                                \
  }                                                                                                            \
  D3F_CLONES void k_scale_rows(T* o, int64_t ldo, int64_t rows, int64_t cols, const T* factor) {               \
    scale_rows<T>(o, ldo, rows, cols, factor);                                                                 \
  }                                                                                                            \
  D3F_CLONES void k_recompute_probs(T* st, int64_t ld, int64_t keys, int64_t queries, const T* lse) {          \
    recompute_probs<T>(st, ld, keys, queries, lse);                                                            \
  }                                                                                                            \
  D3F_CLONES void k_score_grad(const T* pt, T* dpt, int64_t ld, int64_t keys, int64_t queries, const T* delta, \
                               T scale) {                                                                      \
    score_grad<T>(pt, dpt, ld, keys, queries, delta, scale);                                                   \
  }                                                                                                            \
  D3F_CLONES void k_row_dots(const T* a, const T* b, int64_t ld, int64_t rows, int64_t cols, T* delta) {       \
    row_dots<T>(a, b, ld, rows, cols, delta);                                                                  \
  }

D3F_ATTN_ENTRY_POINTS(float)
D3F_ATTN_ENTRY_POINTS(double)
#undef D3F_ATTN_ENTRY_POINTS

constexpr int64_t kKeyTile = 512;  // keys per score tile

// Queries per block: large enough that each BLAS call amortises its dispatch, small
// enough that a score tile (`budget` elements) stays in L2, and with enough blocks
// (`tasks_per_block` tasks each) to keep every thread busy.
int64_t query_block(int64_t N, int64_t L, int64_t tasks_per_block, int64_t budget) {
  int64_t rows = std::min<int64_t>(1024, budget / std::min(kKeyTile, L));
  const int64_t want_tasks = 4 * at::get_num_threads();
  while (rows > 64 && tasks_per_block * ((N + rows - 1) / rows) < want_tasks) rows /= 2;
  return std::max<int64_t>(1, std::min(rows, N));
}

struct Dims {
  int64_t B, N, L, H, D;
};

std::vector<int64_t> valid_key_counts(const std::optional<at::Tensor>& key_lengths, const Dims& d) {
  std::vector<int64_t> len(size_t(d.B), d.L);
  if (key_lengths) {
    const at::Tensor kl = key_lengths->contiguous();
    const int32_t* p = kl.data_ptr<int32_t>();
    for (int64_t b = 0; b < d.B; ++b) len[b] = p[b];
  }
  return len;
}

// Rows [r0, ...) of head h of sample b of a contiguous (B, rows, H, D) tensor; row stride H * D.
template <typename T>
struct Heads {
  T* base;
  int64_t rows, H, D;
  T* at(int64_t b, int64_t h, int64_t r0) const { return base + ((b * rows + r0) * H + h) * D; }
};

template <typename T>
void zero_rows(T* p, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::fill(p + r * ld, p + r * ld + cols, T(0));
}

// Score tiles are computed transposed, S^T = K_tile Q_block^T (keys x queries), so the
// softmax reduces down columns (see attention_loops.h); every product is one gemm on the
// strided rows of the inputs (blas.h).
template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& len,
             const Dims& d, T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t block = query_block(d.N, d.L, d.B * d.H, 256 * 1024);
  const int64_t q_blocks = (d.N + block - 1) / block;
  const int64_t ld = d.H * d.D, tile = std::min(kKeyTile, d.L);
  const Heads<const T> Q{q.data_ptr<T>(), d.N, d.H, d.D}, K{k.data_ptr<T>(), d.L, d.H, d.D},
      V{v.data_ptr<T>(), d.L, d.H, d.D};
  const Heads<T> O{out.data_ptr<T>(), d.N, d.H, d.D};
  T* lse_ptr = lse.data_ptr<T>();  // (B, H, N)
  struct Scratch {
    std::vector<T> scores_t;  // (keys, queries), row stride `block`
    std::vector<T> m, l, alpha;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<T>(size_t(tile * block)), std::vector<T>(block), std::vector<T>(block),
                   std::vector<T>(block)};
  };
  parallel_tasks(d.B * d.H * q_blocks, make_scratch, [&](Scratch& scratch, int64_t task) {
    auto& [scores_t, m, l, alpha] = scratch;
    // Sample index fastest, so the heavy tasks (samples with more keys) do not bunch up.
    const int64_t b = task % d.B, h = (task / d.B) % d.H, bh = b * d.H + h;
    const int64_t n0 = (task / (d.B * d.H)) * block, rows = std::min(block, d.N - n0);
    T* o = O.at(b, h, n0);
    T* lse_rows = lse_ptr + bh * d.N + n0;
    if (len[b] == 0) {
      zero_rows(o, ld, rows, d.D);
      std::fill(lse_rows, lse_rows + rows, -std::numeric_limits<T>::infinity());
      return;
    }
    const T* qb = Q.at(b, h, n0);
    T* st = scores_t.data();
    std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
    std::fill(l.begin(), l.end(), T(0));
    for (int64_t k0 = 0; k0 < len[b]; k0 += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, len[b] - k0);
      gemm<T>(false, true, keys, rows, d.D, scale, K.at(b, h, k0), ld, qb, ld, T(0), st, block);
      k_online_softmax_tile(st, block, keys, rows, m.data(), l.data(), alpha.data());
      if (k0 > 0) k_scale_rows(o, ld, rows, d.D, alpha.data());
      gemm<T>(true, false, rows, d.D, keys, T(1), st, block, V.at(b, h, k0), ld, k0 == 0 ? T(0) : T(1), o, ld);
    }
    for (int64_t r = 0; r < rows; ++r) {
      lse_rows[r] = m[r] + std::log(l[r]);
      l[r] = T(1) / l[r];
    }
    k_scale_rows(o, ld, rows, d.D, l.data());
  });
}

// One task per (b, h): it owns dK and dV of that head and walks the query blocks.
template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const std::vector<int64_t>& len, const Dims& d, T scale,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t ld = d.H * d.D, tile = std::min(kKeyTile, d.L);
  const int64_t block = query_block(d.N, d.L, std::numeric_limits<int32_t>::max(), 128 * 1024);
  const Heads<const T> Q{q.data_ptr<T>(), d.N, d.H, d.D}, K{k.data_ptr<T>(), d.L, d.H, d.D},
      V{v.data_ptr<T>(), d.L, d.H, d.D}, dO{dout.data_ptr<T>(), d.N, d.H, d.D}, O{out.data_ptr<T>(), d.N, d.H, d.D};
  const Heads<T> dQ{dq.data_ptr<T>(), d.N, d.H, d.D}, dK{dk.data_ptr<T>(), d.L, d.H, d.D},
      dV{dv.data_ptr<T>(), d.L, d.H, d.D};
  const T* lse_ptr = lse.data_ptr<T>();
  struct Scratch {
    std::vector<T> probs_t, dprobs_t;  // (keys, queries), row stride `block`
    std::vector<T> delta;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<T>(size_t(tile * block)), std::vector<T>(size_t(tile * block)),
                   std::vector<T>(block)};
  };
  parallel_tasks(d.B * d.H, make_scratch, [&](Scratch& scratch, int64_t task) {
    auto& [probs_t, dprobs_t, delta] = scratch;
    const int64_t b = task / d.H, h = task % d.H, bh = task;
    T *dk_bh = dK.at(b, h, 0), *dv_bh = dV.at(b, h, 0);
    zero_rows(dk_bh, ld, d.L, d.D);
    zero_rows(dv_bh, ld, d.L, d.D);
    T *pt = probs_t.data(), *dpt = dprobs_t.data();
    for (int64_t n0 = 0; n0 < d.N; n0 += block) {
      const int64_t rows = std::min(block, d.N - n0);
      T* dq_b = dQ.at(b, h, n0);
      if (len[b] == 0) {
        zero_rows(dq_b, ld, rows, d.D);
        continue;
      }
      const T *qb = Q.at(b, h, n0), *dob = dO.at(b, h, n0);
      k_row_dots(dob, O.at(b, h, n0), ld, rows, d.D, delta.data());
      const T* lse_rows = lse_ptr + bh * d.N + n0;
      for (int64_t k0 = 0; k0 < len[b]; k0 += kKeyTile) {
        const int64_t keys = std::min(kKeyTile, len[b] - k0);
        const T *kt = K.at(b, h, k0), *vt = V.at(b, h, k0);
        gemm<T>(false, true, keys, rows, d.D, scale, kt, ld, qb, ld, T(0), pt, block);
        k_recompute_probs(pt, block, keys, rows, lse_rows);
        gemm<T>(false, false, keys, d.D, rows, T(1), pt, block, dob, ld, T(1), dv_bh + k0 * ld, ld);
        gemm<T>(false, true, keys, rows, d.D, T(1), vt, ld, dob, ld, T(0), dpt, block);
        k_score_grad(pt, dpt, block, keys, rows, delta.data(), scale);
        gemm<T>(true, false, rows, d.D, keys, T(1), dpt, block, kt, ld, k0 == 0 ? T(0) : T(1), dq_b, ld);
        gemm<T>(false, false, keys, d.D, rows, T(1), dpt, block, qb, ld, T(1), dk_bh + k0 * ld, ld);
      }
    }
  });
}

// ------------------------------------------------------------- validation and entry points

// The shared checks (op_checks.h), then the key lengths' values, which only the CPU can read cheaply.
Dims check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& key_lengths) {
  const dalle3_fast::AttentionDims a = dalle3_fast::check_attention(op, q, k, v, key_lengths);
  const Dims d{a.B, a.N, a.L, a.H, a.D};
  if (key_lengths) {
    const at::Tensor klc = key_lengths->contiguous();
    const int32_t* p = klc.data_ptr<int32_t>();
    for (int64_t b = 0; b < d.B; ++b)
      TORCH_CHECK(p[b] >= 0 && p[b] <= d.L, op, ": key_lengths[", b, "] = ", p[b], " is outside [0, ", d.L, "]");
  }
  return d;
}

at::ScalarType compute_type(at::ScalarType t) { return dalle3_fast::acc_type(t); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in,
                                                     const std::optional<at::Tensor>& key_lengths, double scale) {
  const Dims d = check_inputs("attention_fwd", q_in, k_in, v_in, key_lengths);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  auto dense = [&](const at::Tensor& t) { return t.detach().to(ct).contiguous(); };
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({d.B, d.H, d.N}, q.options());
  const auto len = valid_key_counts(key_lengths, d);
  AT_DISPATCH_FLOATING_TYPES(ct, "attention_fwd_cpu",
                             [&] { forward<scalar_t>(q, k, v, len, d, scalar_t(scale), out, lse); });
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_lengths,
    double scale) {
  const Dims d = check_inputs("attention_bwd", q_in, k_in, v_in, key_lengths);
  dalle3_fast::check_attention_bwd("attention_bwd", {d.B, d.N, d.L, d.H, d.D}, q_in, grad_out, out_in, lse_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  auto dense = [&](const at::Tensor& t) { return t.detach().to(ct).contiguous(); };
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in), dout = dense(grad_out), out = dense(out_in),
                   lse = dense(lse_in);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const auto len = valid_key_counts(key_lengths, d);
  AT_DISPATCH_FLOATING_TYPES(ct, "attention_bwd_cpu", [&] {
    backward<scalar_t>(dout, q, k, v, out, lse, len, d, scalar_t(scale), dq, dk, dv);
  });
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace
}  // namespace d3f::attn

TORCH_LIBRARY_IMPL(dalle3_fast, CPU, m) {
  m.impl("attention_fwd", &d3f::attn::attention_fwd_cpu);
  m.impl("attention_bwd", &d3f::attn::attention_bwd_cpu);
}
