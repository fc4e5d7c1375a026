// Inner loops of the CPU GroupNorm+SiLU kernel, one contiguous run at a time.
//
// Every element op is affine in x with per-channel coefficients, so a run is either
// one channel's spatial extent (channels-first: coefficients are scalars) or rows of C
// channels (channels-last: coefficients are arrays indexed by channel). The loops are
// plain C++ that the compiler vectorises; simd.h clones them per ISA.
#pragma once

#include <cstdint>

#include "simd.h"

namespace d3f::gn {

template <typename T, bool Silu>
static D3F_INLINE T act(T z) {
  return Silu ? z * sigmoid(z) : z;
}

// d act(z) / dz times dy.
template <typename T, bool Silu>
static D3F_INLINE T act_grad(T z, T dy) {
  if (!Silu) return dy;
  T s = sigmoid(z);
  return dy * s * (T(1) + z * (T(1) - s));
}

// Sums of (x - shift) and (x - shift)^2 over one channel's run. The shift (the run's
// first value) keeps the variance accurate when |mean| >> std. Partial sums over
// blocks of 1024 in T, combined in double.
template <typename T>
static D3F_INLINE void shifted_sums_run(const T* x, int64_t n, T shift, double& s1, double& s2) {
  constexpr int64_t kBlock = 1024;
  double d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = i0 + kBlock < n ? i0 + kBlock : n;
    T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = i0; i < i1; ++i) {
      const T d = x[i] - shift;
      a1 += d;
      a2 += d * d;
    }
    d1 += a1;
    d2 += a2;
  }
  s1 = d1;
  s2 = d2;
}

// Channels-last: the same sums per channel over `rows` rows of C values (row stride C).
template <typename T>
static D3F_INLINE void shifted_sums_rows(const T* x, int64_t rows, int64_t C, const T* shift, T* s1, T* s2) {
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T d = xr[c] - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// y = act(x * a + b) over a run with scalar coefficients.
template <typename T, bool Silu>
static D3F_INLINE void apply_run(const T* x, T* y, int64_t n, T a, T b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = act<T, Silu>(x[i] * a + b);
}

template <typename T, bool Silu>
static D3F_INLINE void apply_rows(const T* x, T* y, int64_t rows, int64_t C, const T* a, const T* b) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = act<T, Silu>(xr[c] * a[c] + b[c]);
  }
}

// Backward, first pass: with dz = dy * act'(x * a + b), the sums of dz, dz * x and x.
template <typename T, bool Silu>
static D3F_INLINE void grad_sums_run(const T* x, const T* dy, int64_t n, T a, T b, double& sdz, double& sdzx,
                                 double& sx) {
  constexpr int64_t kBlock = 1024;
  double d0 = 0, d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = i0 + kBlock < n ? i0 + kBlock : n;
    T a0 = 0, a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a0, a1, a2)
    for (int64_t i = i0; i < i1; ++i) {
      const T dz = act_grad<T, Silu>(x[i] * a + b, dy[i]);
      a0 += dz;
      a1 += dz * x[i];
      a2 += x[i];
    }
    d0 += a0;
    d1 += a1;
    d2 += a2;
  }
  sdz = d0;
  sdzx = d1;
  sx = d2;
}

template <typename T, bool Silu>
static D3F_INLINE void grad_sums_rows(const T* x, const T* dy, int64_t rows, int64_t C, const T* a, const T* b, T* sdz,
                                  T* sdzx, T* sx) {
  for (int64_t c = 0; c < C; ++c) sdz[c] = sdzx[c] = sx[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    const T* dyr = dy + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T dz = act_grad<T, Silu>(xr[c] * a[c] + b[c], dyr[c]);
      sdz[c] += dz;
      sdzx[c] += dz * xr[c];
      sx[c] += xr[c];
    }
  }
}

// Backward, second pass: dx = dz * p + x * q + r.
template <typename T, bool Silu>
static D3F_INLINE void grad_apply_run(const T* x, const T* dy, T* dx, int64_t n, T a, T b, T p, T q, T r) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = act_grad<T, Silu>(x[i] * a + b, dy[i]) * p + x[i] * q + r;
}

template <typename T, bool Silu>
static D3F_INLINE void grad_apply_rows(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const T* a, const T* b,
                                   const T* p, const T* q, const T* r) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t o = row * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      dx[o + c] = act_grad<T, Silu>(x[o + c] * a[c] + b[c], dy[o + c]) * p[c] + x[o + c] * q[c] + r[c];
  }
}

}  // namespace d3f::gn
