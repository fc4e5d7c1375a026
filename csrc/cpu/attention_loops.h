// Row-wise loops of the CPU attention kernel (the matrix products go to BLAS).
// Every matrix is row-major with an explicit leading dimension.
#pragma once

#include <cstdint>
#include <limits>

#include "simd.h"

namespace d3f::attn {

// The score tiles are stored transposed, st[key, query] (leading dim ld), so every
// per-query reduction runs down the columns: vectorised across queries, with no
// horizontal reductions.

// Online softmax over one tile of scaled scores: st <- exp(st - m_new), m <- m_new =
// max(m, colmax(st)), alpha <- exp(m_old - m_new) (the factor for what was accumulated
// before; 0 on the first tile), l <- l * alpha + colsum.
template <typename T>
static D3F_INLINE void online_softmax_tile(T* st, int64_t ld, int64_t keys, int64_t queries, T* m, T* l, T* alpha) {
  T* m_new = alpha;  // scratch until the factors are computed
  for (int64_t j = 0; j < queries; ++j) m_new[j] = m[j];
  for (int64_t i = 0; i < keys; ++i) {
    const T* row = st + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < queries; ++j) m_new[j] = row[j] > m_new[j] ? row[j] : m_new[j];
  }
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < queries; ++j) {
    const T factor = m[j] == kNegInf ? T(0) : exp_any(m[j] - m_new[j]);
    l[j] *= factor;
    m[j] = m_new[j];
    alpha[j] = factor;
  }
  for (int64_t i = 0; i < keys; ++i) {
    T* row = st + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < queries; ++j) {
      row[j] = exp_any(row[j] - m[j]);
      l[j] += row[j];
    }
  }
}

// o[r, :cols] *= factor[r]
template <typename T>
static D3F_INLINE void scale_rows(T* o, int64_t ldo, int64_t rows, int64_t cols, const T* factor) {
  for (int64_t r = 0; r < rows; ++r) {
    T* orow = o + r * ldo;
    const T f = factor[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) orow[j] *= f;
  }
}

// Backward: st <- P^T = exp(st - lse[query]) from scaled scores, the forward's probabilities.
template <typename T>
static D3F_INLINE void recompute_probs(T* st, int64_t ld, int64_t keys, int64_t queries, const T* lse) {
  for (int64_t i = 0; i < keys; ++i) {
    T* row = st + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < queries; ++j) row[j] = exp_any(row[j] - lse[j]);
  }
}

// Backward: dpt <- dS^T = P^T * (dP^T - delta[query]) * scale, the gradient wrt the unscaled scores.
template <typename T>
static D3F_INLINE void score_grad(const T* pt, T* dpt, int64_t ld, int64_t keys, int64_t queries, const T* delta,
                                  T scale) {
  for (int64_t i = 0; i < keys; ++i) {
    const T* prow = pt + i * ld;
    T* drow = dpt + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < queries; ++j) drow[j] = prow[j] * (drow[j] - delta[j]) * scale;
  }
}

// delta[r] = sum_j a[r, j] * b[r, j]
template <typename T>
static D3F_INLINE void row_dots(const T* a, const T* b, int64_t ld, int64_t rows, int64_t cols, T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += a[r * ld + j] * b[r * ld + j];
    delta[r] = acc;
  }
}

}  // namespace d3f::attn
