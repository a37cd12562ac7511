// Row-major GEMM for the attention kernels: C = alpha·op(A)·op(B) + beta·C.
//
// Calls the Fortran BLAS symbols sgemm_/dgemm_ that libtorch_cpu exports (MKL in the x86 Linux
// wheels). They are declared weak, so an extension built against a torch without them still loads
// and falls back to the plain loop below. Called from inside at::parallel_for: MKL sees an active
// OpenMP region and runs single-threaded, which is what we want (parallelism is over heads/rows).
#pragma once

#include <cstdint>
#include <limits>

#include <c10/util/Exception.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastflow {
namespace blas {

inline bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Reference loop (no BLAS in this torch build): correct, not fast.
template <typename T>
void gemm_loop(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) c_row[j] = beta == T(0) ? T(0) : beta * c_row[j];
    for (int64_t p = 0; p < k; ++p) {
      const T a_ip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b[j * ldb + p];
      } else {
        const T* b_row = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
      }
    }
  }
}

// Row-major C (m×n, ld ldc) = alpha·op(A)·op(B) + beta·C, op(A) m×k, op(B) k×n. Column-major
// BLAS sees the transposes: Cᵀ = op(B)ᵀ·op(A)ᵀ.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m < kIntMax && n < kIntMax && k < kIntMax && lda < kIntMax && ldb < kIntMax && ldc < kIntMax,
              "fastflow gemm: dimension exceeds 32-bit BLAS");
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int lda_i = static_cast<int>(ldb), ldb_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  if constexpr (sizeof(T) == 4) {
    if (sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
      return;
    }
  }
  gemm_loop(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace blas
}  // namespace fastflow
