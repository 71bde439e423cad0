// nsl CPU kernel: GEMM backends (see gemm.h).
//  * "brgemm" (float only): at::native::cpublas::brgemm, oneDNN's JIT batch-reduce GEMM kernel
//    (about 20% faster than MKL's sgemm on the kernel's tile shapes); it keeps all of A hot, so
//    only for A up to kBrgemmMaxA elements, and up to the L2 size unless N is narrow (beyond,
//    BLAS's cache blocking wins). Torch itself
//    falls back to BLAS inside it where oneDNN's ukernels are not built in.
//  * "blas": torch's own BLAS (MKL or OpenBLAS, whichever torch was built with) through ATen:
//    at::mm_out / at::addmm_out on from_blob views of the buffers (no copies). This takes 64-bit
//    sizes (ATen falls back to its portable kernel where BLAS's 32-bit ones would overflow),
//    binds to torch's BLAS whatever other BLAS the process loaded, and runs under torch's
//    threading rules (single-threaded inside at::parallel_for). (at::native::cpublas::gemm's
//    BLAS overloads for float and double are not exported by libtorch_cpu, so an extension
//    reaches torch's BLAS through the ATen ops.)
//  * "at::mm": at::mm into a new tensor, then added or copied into C (testing only).
// (ATen's portable GEMM kernel is out of reach too: cpublas::gemm<scalar_t> and gemm_stub need
// symbols libtorch_cpu does not export.)
#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/InferenceMode.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace nsl {

namespace {

// GEMM backend: 0 = best available, 1 = BLAS only, 2 = at::mm only.
int g_gemm_backend = 0;

constexpr int64_t kBrgemmMaxA = 512 * 1024;

// L2 bytes per core (sysconf where glibc knows it, else 512 KiB): brgemm streams all of A once per
// block of N columns, so an A larger than L2 with a wide N comes from L3 again and again (dW^T of
// a 256-channel 14x14 layer, A = 2304 x 98: 1.6x slower than BLAS on a 512 KiB-L2 core).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    int64_t b = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? b : int64_t(512) * 1024;
  }();
  return bytes;
}

template <typename scalar_t>
inline bool brgemm_call(int64_t, int64_t, int64_t, const scalar_t*, int64_t, const scalar_t*,
                        int64_t, bool, scalar_t*, int64_t) {
  return false;
}
#if defined(CPUBLAS_BRGEMM_F32F32F32)
template <>
inline bool brgemm_call<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                               const float* B, int64_t ldb, bool add, float* C, int64_t ldc) {
  if (M * K > kBrgemmMaxA || (M * K * int64_t(sizeof(float)) > l2_bytes() && N > 64)) return false;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
  return true;
}
#endif

template <typename scalar_t>
void blas_call(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
               int64_t ldb, bool add, scalar_t* C, int64_t ldc) {
  c10::InferenceMode guard;  // plain tensors: skip the autograd layer of the dispatcher
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, {lda, 1}, opts);
  const auto b = at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (add) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// at::mm into a fresh tensor, then copied (the pre-BLAS-through-ATen fallback; testing only).
template <typename scalar_t>
void mm_call(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
             int64_t ldb, bool add, scalar_t* C, int64_t ldc) {
  c10::InferenceMode guard;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, {lda, 1}, opts);
  const auto b = at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (add) {
    c.add_(at::mm(a, b));
  } else {
    c.copy_(at::mm(a, b));
  }
}

}  // namespace

template <typename scalar_t>
void gemm_nn(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
             int64_t ldb, bool add, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (g_gemm_backend == 0 && brgemm_call(M, N, K, A, lda, B, ldb, add, C, ldc)) return;
  if (g_gemm_backend == 2) {
    mm_call(M, N, K, A, lda, B, ldb, add, C, ldc);
  } else {
    blas_call(M, N, K, A, lda, B, ldb, add, C, ldc);
  }
}

template void gemm_nn<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                             int64_t, bool, float*, int64_t);
template void gemm_nn<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                              int64_t, bool, double*, int64_t);

std::vector<std::string> gemm_backends() {
  std::vector<std::string> r;
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  r.push_back("brgemm");
#endif
  r.push_back("blas");
  r.push_back("at::mm");
  return r;
}

int64_t set_gemm_backend(int64_t backend) {
  TORCH_CHECK(backend >= 0 && backend <= 2, "backend must be 0, 1 or 2");
  const int64_t old = g_gemm_backend;
  g_gemm_backend = static_cast<int>(backend);
  return old;
}

}  // namespace nsl
