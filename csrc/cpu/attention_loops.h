// Row-wise loops of the CPU attention kernel (the matrix products go to BLAS).
// Every matrix is row-major with an explicit leading dimension.
#pragma once

#include <cstdint>
#include <limits>

#include "simd.h"

namespace d3f::attn {

// Online softmax over one key tile of scores s (rows x cols, leading dim lds):
// s <- exp(s * scale - m_new), m <- m_new = max(m, rowmax(s * scale)),
// alpha <- exp(m_old - m_new) (the factor that rescales what was accumulated before),
// l <- l * alpha + rowsum.
template <typename T>
static D3F_INLINE void online_softmax_tile(T* s, int64_t lds, int64_t rows, int64_t cols, T scale, T* m, T* l,
                                       T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * lds;
    T mx = m[r];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) {
      sr[j] *= scale;
      mx = sr[j] > mx ? sr[j] : mx;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      sr[j] = exp_any(sr[j] - mx);
      sum += sr[j];
    }
    alpha[r] = m[r] == -std::numeric_limits<T>::infinity() ? T(0) : exp_any(m[r] - mx);
    l[r] = l[r] * alpha[r] + sum;
    m[r] = mx;
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

// Backward: s <- P = exp(s * scale - lse[r]), the forward's normalised probabilities.
template <typename T>
static D3F_INLINE void recompute_probs(T* s, int64_t lds, int64_t rows, int64_t cols, T scale, const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * lds;
    const T shift = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) sr[j] = exp_any(sr[j] * scale - shift);
  }
}

// Backward: dp <- dS = P * (dP - delta[r]) * scale, the gradient wrt the unscaled scores.
template <typename T>
static D3F_INLINE void score_grad(const T* p, int64_t ldp, T* dp, int64_t lddp, int64_t rows, int64_t cols,
                              const T* delta, T scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = p + r * ldp;
    T* dpr = dp + r * lddp;
    const T d = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) dpr[j] = pr[j] * (dpr[j] - d) * scale;
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
