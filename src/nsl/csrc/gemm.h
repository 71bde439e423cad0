// nsl CPU kernel: the one GEMM shape the kernel needs, on raw row-major buffers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nsl {

// C[M, N] = A[M, K] B[K, N] (+ C when add), row-major, no transposes, leading dimensions in
// elements (lda >= K, ldb >= N, ldc >= N); all sizes 64-bit. Instantiated for float and double.
// Backends, fastest first (see gemm.cpp): oneDNN brgemm (float, A up to kBrgemmMaxA elements),
// then torch's BLAS through ATen.
template <typename scalar_t>
void gemm_nn(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
             int64_t ldb, bool add, scalar_t* C, int64_t ldc);

// The GEMM backends compiled in, fastest first ("brgemm" where torch ships oneDNN's ukernels,
// "blas", "at::mm").
std::vector<std::string> gemm_backends();

// Testing / benchmarking switch: 0 = best available, 1 = BLAS only, 2 = at::mm only. Returns
// the previous value.
int64_t set_gemm_backend(int64_t backend);

}  // namespace nsl
