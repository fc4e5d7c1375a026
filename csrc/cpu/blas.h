// Row-major matrix products on raw pointers, for the small per-tile products of the kernels.
//
// at::addmm_out on strided tile views costs a few microseconds of tensor bookkeeping per
// call, more than the product itself at the tiles of small U-Nets. When PyTorch's BLAS
// exports the Fortran gemm (MKL and OpenBLAS do), it is called directly; otherwise the
// tiles are wrapped as tensors for at::addmm_out.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
// Weak: null where the BLAS PyTorch links does not export them. The integer arguments are
// passed as pointers to int64 values below 2^31, read correctly by both LP64 (int32) and
// ILP64 (int64) BLAS builds on a little-endian machine.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));
#define D3F_HAVE_FORTRAN_GEMM 1
#endif

namespace d3f {

namespace detail {

template <typename T>
at::Tensor tile(const T* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  at::Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return transposed ? t.t() : t;
}

template <typename T>
void gemm_with_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  at::Tensor out = tile(c, m, n, ldc, false);
  const at::Tensor A = ta ? tile(a, k, m, lda, true) : tile(a, m, k, lda, false);
  const at::Tensor B = tb ? tile(b, n, k, ldb, true) : tile(b, k, n, ldb, false);
  if (beta == T(0)) {
    at::mm_out(out, A, B);
    if (alpha != T(1)) out.mul_(alpha);
  } else {
    out.addmm_(A, B, beta, alpha);
  }
}

}  // namespace detail

// C[m, n] = alpha * op(A) op(B) + beta * C, all row-major with row strides lda, ldb, ldc;
// op(A) is m x k (A is stored k x m when ta), op(B) is k x n (stored n x k when tb).
// beta == 0 overwrites C (its old contents may be anything).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : c[i * ldc + j] * beta;
    return;
  }
#ifdef D3F_HAVE_FORTRAN_GEMM
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char transa = tb ? 'T' : 'N', transb = ta ? 'T' : 'N';
  const int64_t M = n, N = m, K = k, LDA = ldb, LDB = lda, LDC = ldc;
  const auto* iM = reinterpret_cast<const int*>(&M);
  const auto* iN = reinterpret_cast<const int*>(&N);
  const auto* iK = reinterpret_cast<const int*>(&K);
  const auto* iLDA = reinterpret_cast<const int*>(&LDA);
  const auto* iLDB = reinterpret_cast<const int*>(&LDB);
  const auto* iLDC = reinterpret_cast<const int*>(&LDC);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&transa, &transb, iM, iN, iK, &alpha, b, iLDA, a, iLDB, &beta, c, iLDC);
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr) return dgemm_(&transa, &transb, iM, iN, iK, &alpha, b, iLDA, a, iLDB, &beta, c, iLDC);
  }
#endif
  detail::gemm_with_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace d3f
