// Fused CPU kernel for dynamic neural similarity convolution (nsl).
//
// Shapes (all tensors contiguous, float32 or float64):
//   x      [N, C_in, H, W]
//   weight [C_out, C_in/groups, kh, kw],  P = kh*kw, position q = i*kw + j has offset (i, j)
//   m      [N, P, H_out, W_out]            (diagonal layout)
//   M      [N, P, P, H_out, W_out]         (full layout; M[n, p, q] links filter position p
//                                           with input position q)
//   out    [N, C_out, H_out, W_out],  H_out = (H + 2 ph - dh (kh - 1) - 1) / sh + 1 (same for W)
//
// With col[c, q](y) = x[c, y_h sh + dh i - ph, y_w sw + dw j - pw] (zero outside the image):
//   diagonal: out[o](y) = sum_{c in group(o), q} W[o, c, q] m[q](y) col[c, q](y)
//   full:     out[o](y) = sum_{c, p} W[o, c, p] sum_q M[p, q](y) col[c, q](y)
// m = 1 (M = I) gives exactly F.conv2d; no bias. A padded column entry is a real zero that m or
// M multiplies (IEEE: a NaN or inf in m at a padded position makes that output NaN, as on every
// other backend and in F.conv2d with a non-finite weight).
//
// Strategy (see docs/fast-dynamic.md): never materialise the P-times column tensor of a whole
// batch. Each image is cut into tiles of T consecutive output locations (flattened y) sized so
// one [C_in/groups * P, T] column tile stays in L2. Per tile and group we build the (modulated)
// column tile B with row-wise copies and feed it to one GEMM with W_g [C_out/g, C_in/g * P]:
//   out_tile = W_g B.
// Backward (g = dL/dout) rebuilds the tiles instead of saving them:
//   C = col tile (unmodulated),  H = W_g^T g_tile                     (GEMM, [K, T])
//   diagonal: dm[q](y) += sum_c H[c, q](y) C[c, q](y)
//             dx(input location of col[c, q](y)) += m[q](y) H[c, q](y)   (row-wise scatter-add)
//             dW_g += g_tile (m * C)^T                                (GEMM)
//   full:     dM[p, q](y) += sum_c H[c, p](y) C[c, q](y)
//             dx(input location of col[c, q](y)) += sum_p M[p, q](y) H[c, p](y)
//             dW_g += g_tile B^T,  B[c, p] = sum_q M[p, q] C[c, q]     (GEMM)
// All GEMMs are untransposed row-major products (W_g^T is formed once per backward call, dW is
// accumulated transposed), so oneDNN's brgemm kernel can serve them (see gemm_nn).
// Work is parallelised over images (at::parallel_for; the GEMMs then run single-threaded inside
// each thread), or over tiles of one image when there are fewer images than threads. Each
// thread owns its workspace and a dW accumulator; dx of an image is written by one thread only
// (per-thread dx buffers in the tile-parallel mode), so there are no races.
// On the common stride-1 "same" geometry the column rows are contiguous shifted runs of the
// input planes (see Bulk), so building, scattering and the diagonal backward are long
// vectorised loops; the P x P products of the full layout are register-blocked for P = 4, 9, 25.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <vector>

// Fortran BLAS entry points exported by libtorch_cpu on Linux builds (MKL or OpenBLAS inside).
// Declared weak so that the extension still links and loads where they are absent; we then
// fall back to at::mm on tensor views (slower per call, same result). Elsewhere (macOS, MSVC)
// the fallback is always used.
#if defined(__linux__) && defined(__GNUC__)
#define NSL_DIRECT_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}
#else
#define NSL_DIRECT_BLAS 0
#endif

// The element-wise loops are compiled for several instruction sets and picked at load time
// (GCC function multiversioning), since the extension itself is built for the baseline ISA only:
// NSL_MULTIVERSION on the per-tile entry points, NSL_INLINE on the loops they inline. (An
// x86-64-v4 / AVX-512 clone serves the 512-bit P x P loops of the full layout, see g_avx512.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 11
#define NSL_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NSL_MULTIVERSION
#endif
#if defined(__GNUC__) || defined(__clang__)
#define NSL_INLINE inline __attribute__((always_inline))
#define NSL_VECTOR_EXT 1  // GCC/Clang vector extension available (register-blocked P x P loops)
#else
#define NSL_INLINE __forceinline
#define NSL_VECTOR_EXT 0
#endif

namespace {

// Bytes targeted for one [K, T] tile buffer (tunable through set_tile_bytes for benchmarking).
int64_t g_tile_bytes = 256 * 1024;
// Fewest output locations per tile, whatever the byte budget (tunable through set_min_tile).
int64_t g_min_tile = 100;
// GEMM backend: 0 = best available (oneDNN brgemm for float where torch ships it, else BLAS);
// 1 = BLAS only; 2 = the at::mm fallback only (testing switch, set_gemm_backend).
int g_gemm_backend = 0;

// ------------------------------------------------------------------------------------------
// GEMM on row-major matrices, no transposes: C[M, N] = A[M, K] B[K, N] (+ C if add), leading
// dimensions in elements. Backends, fastest first:
//  * float: at::native::cpublas::brgemm, oneDNN's JIT batch-reduce GEMM kernel (about 20%
//    faster than MKL's sgemm on these shapes here); it keeps all of A hot, so only for A up to
//    kBrgemmMaxA elements (beyond, MKL's cache blocking wins). It falls back to BLAS inside
//    torch where oneDNN's ukernels are not built in.
//  * BLAS (sgemm_/dgemm_ as exported by libtorch_cpu), called directly: no tensor overhead.
//  * at::mm on from_blob views where neither is available.
// ------------------------------------------------------------------------------------------
constexpr int64_t kBrgemmMaxA = 512 * 1024;

template <typename scalar_t>
void gemm_fallback(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                   const scalar_t* B, int64_t ldb, bool add, scalar_t* C, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (add) {
    c.addmm_(a, b);
  } else {
    c.copy_(at::mm(a, b));
  }
}

#if NSL_DIRECT_BLAS
inline bool blas_call(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                      float beta, float* c, int ldc) {
  if (sgemm_ == nullptr) return false;
  const float alpha = 1;
  sgemm_("N", "N", &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  return true;
}
inline bool blas_call(int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                      double beta, double* c, int ldc) {
  if (dgemm_ == nullptr) return false;
  const double alpha = 1;
  dgemm_("N", "N", &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  return true;
}
#endif

template <typename scalar_t>
NSL_INLINE bool brgemm_call(int64_t, int64_t, int64_t, const scalar_t*, int64_t, const scalar_t*,
                            int64_t, bool, scalar_t*, int64_t) {
  return false;
}
#if defined(CPUBLAS_BRGEMM_F32F32F32)
template <>
NSL_INLINE bool brgemm_call<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, bool add, float* C, int64_t ldc) {
  if (M * K > kBrgemmMaxA) return false;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
  return true;
}
#endif

template <typename scalar_t>
void gemm_nn(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
             int64_t ldb, bool add, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (g_gemm_backend == 0 && brgemm_call(M, N, K, A, lda, B, ldb, add, C, ldc)) return;
#if NSL_DIRECT_BLAS
  // Row-major C = A B is column-major C^T = B^T A^T.
  if (g_gemm_backend <= 1 &&
      blas_call(static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), B,
                static_cast<int>(ldb), A, static_cast<int>(lda), scalar_t(add ? 1 : 0), C,
                static_cast<int>(ldc))) {
    return;
  }
#endif
  gemm_fallback(M, N, K, A, lda, B, ldb, add, C, ldc);
}

// ------------------------------------------------------------------------------------------
// Geometry and tiling
// ------------------------------------------------------------------------------------------
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

struct Geom {
  int64_t N, C_in, H, W, C_out, groups, cin_g, cout_g, kh, kw, P;
  int64_t sh, sw, ph, pw, dh, dw, Ho, Wo, L;
  int64_t K;       // rows of a column tile: cin_g * P
  int64_t T;       // output locations per tile
  int64_t ntiles;  // tiles per image
  // For each kernel column j: output columns [xlo[j], xhi[j]) read inside the image.
  std::vector<int64_t> xlo, xhi;
  bool shift_path;  // stride 1 and W_out == W: see Bulk
};

Geom make_geom(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
               int64_t elem_size) {
  TORCH_CHECK(x.dim() == 4, "x must be [N, C_in, H, W]");
  TORCH_CHECK(w.dim() == 4, "weight must be [C_out, C_in/groups, kh, kw]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have two entries");
  Geom g;
  g.N = x.size(0); g.C_in = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.C_out = w.size(0); g.kh = w.size(2); g.kw = w.size(3); g.P = g.kh * g.kw;
  g.groups = groups;
  TORCH_CHECK(groups >= 1 && g.C_in % groups == 0 && g.C_out % groups == 0,
              "groups must divide C_in and C_out");
  g.cin_g = g.C_in / groups; g.cout_g = g.C_out / groups;
  TORCH_CHECK(w.size(1) == g.cin_g, "weight.size(1) must be C_in/groups");
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(g.P >= 1, "empty kernel");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 &&
              g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0 && g.Ho > 0 && g.Wo > 0,
              "kernel larger than the padded input");
  g.L = g.Ho * g.Wo;
  g.K = g.cin_g * g.P;
  // Tile length: as many locations as fit the byte budget, but at least g_min_tile (the GEMMs'
  // free dimension: H = W^T g and out = W B stream all of W once per tile, and dW^T += B g^T has
  // the tile length as its inner dimension, so short tiles of wide layers are slow), then evened
  // out over the tiles an image needs (no short last tile), rounded up to whole output rows when
  // a row fits.
  int64_t t = std::max<int64_t>(1, g_tile_bytes / (g.K * elem_size));
  t = std::min(g.L, std::max(t, std::min<int64_t>(g.L, g_min_tile)));
  const int64_t nt = (g.L + t - 1) / t;
  t = (g.L + nt - 1) / nt;
  if (t >= g.Wo) t = std::min(g.L, (t + g.Wo - 1) / g.Wo * g.Wo);
  g.T = t;
  g.ntiles = (g.L + t - 1) / t;
  g.xlo.resize(g.kw); g.xhi.resize(g.kw);
  for (int64_t j = 0; j < g.kw; ++j) {
    const int64_t off = g.dw * j - g.pw;  // input column = x * sw + off
    int64_t lo = std::max<int64_t>(0, ceil_div(-off, g.sw));
    int64_t hi = std::min<int64_t>(g.Wo, floor_div(g.W - 1 - off, g.sw) + 1);
    lo = std::min(lo, g.Wo);
    g.xlo[j] = lo; g.xhi[j] = std::max(lo, hi);
  }
  g.shift_path = g.sh == 1 && g.sw == 1 && g.Wo == g.W;
  return g;
}

// A tile: output locations [t0, t0 + len) in flattened (y_h, y_w) order, also split into
// pieces of output rows for the general geometry path.
struct Segment {
  int64_t yh, x0, x1, off;  // output row, columns [x0, x1), offset of x0 inside the tile
};

struct Tile {
  int64_t t0 = 0, len = 0;
  std::vector<Segment> segs;

  void set(const Geom& g, int64_t start, int64_t length) {
    t0 = start; len = length;
    segs.clear();
    for (int64_t t = t0; t < t0 + len;) {
      const int64_t yh = t / g.Wo, x0 = t % g.Wo;
      const int64_t x1 = std::min(g.Wo, x0 + (t0 + len - t));
      segs.push_back({yh, x0, x1, t - t0});
      t += x1 - x0;
    }
  }
};

// Shift path (stride 1, W_out == W, e.g. "same" convolutions): the input location of
// col[c, q](t) is plane index t + shift, so a whole tile row is one contiguous run, except for
// the border columns (which would wrap into the neighbouring image row) and for output rows
// whose input row lies in the vertical padding. Tile offsets [lo, hi) hold every in-image
// location (plus border columns, which the callers zero) and index the plane in bounds.
struct Bulk {
  int64_t lo, hi, shift;
};

NSL_INLINE Bulk bulk_range(const Geom& g, const Tile& tl, int64_t i, int64_t j) {
  const int64_t di = g.dh * i - g.ph, shift = di * g.W + g.dw * j - g.pw;
  const int64_t ylo = std::max<int64_t>(0, -di), yhi = std::min(g.Ho, g.H - di);
  const int64_t lo = std::max({tl.t0, ylo * g.Wo, -shift});
  const int64_t hi = std::min({tl.t0 + tl.len, yhi * g.Wo, g.H * g.W - shift});
  return {lo - tl.t0, std::max(lo, hi) - tl.t0, shift};
}

// Zero the entries of a tile row whose output column x reads outside the image for kernel
// column j (x < xlo[j] or x >= xhi[j]); used on the shift path only.
template <typename scalar_t>
NSL_INLINE void zero_border_cols(const Geom& g, const Tile& tl, int64_t j, scalar_t* d) {
  const int64_t xlo = g.xlo[j], xhi = g.xhi[j];
  if (xlo == 0 && xhi == g.Wo) return;
  for (const Segment& s : tl.segs) {
    scalar_t* r = d + s.off - s.x0;  // indexed by output column
    for (int64_t x = s.x0; x < std::min(xlo, s.x1); ++x) r[x] = 0;
    for (int64_t x = std::max(xhi, s.x0); x < s.x1; ++x) r[x] = 0;
  }
}

// Padded entries of a modulated row: m * 0 (IEEE, like every other backend and F.conv2d: a
// non-finite m at a zero-padded position gives NaN, not 0). pad_fill: d[t] = m[t] * 0 on
// [lo, hi); pad_border_cols: the same on the border columns of kernel column j (shift path).
template <typename scalar_t>
NSL_INLINE void pad_fill(const scalar_t* __restrict m, scalar_t* __restrict d, int64_t lo,
                         int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) d[t] = m[t] * scalar_t(0);
}

template <typename scalar_t>
NSL_INLINE void pad_border_cols(const Geom& g, const Tile& tl, int64_t j, const scalar_t* m,
                                scalar_t* d) {
  const int64_t xlo = g.xlo[j], xhi = g.xhi[j];
  if (xlo == 0 && xhi == g.Wo) return;
  for (const Segment& s : tl.segs) {
    const int64_t base = s.off - s.x0;  // tile offset of output column 0 of this segment
    pad_fill(m + base, d + base, s.x0, std::min(xlo, s.x1));
    pad_fill(m + base, d + base, std::max(xhi, s.x0), s.x1);
  }
}

// ------------------------------------------------------------------------------------------
// Column tiles, one row (c, q = i * kw + j) at a time
// ------------------------------------------------------------------------------------------

// d[t] = (m[t] *) col[c, q](t0 + t) for t in [0, len); xc: input plane of channel c [H, W];
// m (may be null): m[n, q, t0].
template <typename scalar_t>
NSL_INLINE void build_row(const Geom& g, const Tile& tl, int64_t i, int64_t j,
                          const scalar_t* __restrict xc, const scalar_t* __restrict m,
                          scalar_t* __restrict d) {
  if (g.shift_path) {
    const Bulk b = bulk_range(g, tl, i, j);
    const scalar_t* __restrict src = xc + tl.t0 + b.shift;
    if (m) {
      pad_fill(m, d, 0, b.lo);
      for (int64_t t = b.lo; t < b.hi; ++t) d[t] = m[t] * src[t];
      pad_fill(m, d, b.hi, tl.len);
      pad_border_cols(g, tl, j, m, d);
      return;
    }
    for (int64_t t = 0; t < b.lo; ++t) d[t] = 0;
    if (b.hi > b.lo) std::memcpy(d + b.lo, src + b.lo, (b.hi - b.lo) * sizeof(scalar_t));
    for (int64_t t = b.hi; t < tl.len; ++t) d[t] = 0;
    zero_border_cols(g, tl, j, d);
    return;
  }
  const int64_t xlo = g.xlo[j], xhi = g.xhi[j], coff = g.dw * j - g.pw, sw = g.sw;
  for (const Segment& s : tl.segs) {
    scalar_t* __restrict r = d + s.off - s.x0;  // indexed by output column x
    const scalar_t* __restrict mr = m ? m + s.off - s.x0 : nullptr;
    const int64_t ih = s.yh * g.sh + g.dh * i - g.ph;
    if (ih < 0 || ih >= g.H) {
      if (m) {
        pad_fill(mr, r, s.x0, s.x1);
      } else {
        for (int64_t x = s.x0; x < s.x1; ++x) r[x] = 0;
      }
      continue;
    }
    const int64_t lo = std::min(std::max(xlo, s.x0), s.x1);
    const int64_t hi = std::max(std::min(xhi, s.x1), lo);
    if (m) {
      pad_fill(mr, r, s.x0, lo);
      pad_fill(mr, r, hi, s.x1);
    } else {
      for (int64_t x = s.x0; x < lo; ++x) r[x] = 0;
      for (int64_t x = hi; x < s.x1; ++x) r[x] = 0;
    }
    const scalar_t* __restrict src = xc + ih * g.W + coff;  // indexed by x * sw
    if (m) {
      if (sw == 1) {
        for (int64_t x = lo; x < hi; ++x) r[x] = mr[x] * src[x];
      } else {
        for (int64_t x = lo; x < hi; ++x) r[x] = mr[x] * src[x * sw];
      }
    } else if (sw == 1) {
      if (hi > lo) std::memcpy(r + lo, src + lo, (hi - lo) * sizeof(scalar_t));
    } else {
      for (int64_t x = lo; x < hi; ++x) r[x] = src[x * sw];
    }
  }
}

// Adjoint of build_row without m: dxc(input location of col[c, q](t0 + t)) += d[t].
// d's border columns may be zeroed in place.
template <typename scalar_t>
NSL_INLINE void scatter_row(const Geom& g, const Tile& tl, int64_t i, int64_t j,
                            scalar_t* __restrict dxc, scalar_t* __restrict d) {
  if (g.shift_path) {
    zero_border_cols(g, tl, j, d);
    const Bulk b = bulk_range(g, tl, i, j);
    scalar_t* __restrict dst = dxc + tl.t0 + b.shift;
    for (int64_t t = b.lo; t < b.hi; ++t) dst[t] += d[t];
    return;
  }
  const int64_t xlo = g.xlo[j], xhi = g.xhi[j], coff = g.dw * j - g.pw, sw = g.sw;
  for (const Segment& s : tl.segs) {
    const int64_t ih = s.yh * g.sh + g.dh * i - g.ph;
    if (ih < 0 || ih >= g.H) continue;
    const int64_t lo = std::min(std::max(xlo, s.x0), s.x1);
    const int64_t hi = std::max(std::min(xhi, s.x1), lo);
    const scalar_t* __restrict r = d + s.off - s.x0;
    scalar_t* __restrict dst = dxc + ih * g.W + coff;
    if (sw == 1) {
      for (int64_t x = lo; x < hi; ++x) dst[x] += r[x];
    } else {
      for (int64_t x = lo; x < hi; ++x) dst[x * sw] += r[x];
    }
  }
}

// All rows of a column tile: buf[(c * P + q) * ld + t] = (m *) col[c, q](t0 + t);
// xg: [cin_g, H, W] planes of the group; m (may be null): m[n, 0, t0] (rows L apart).
template <typename scalar_t>
NSL_INLINE void build_cols(const Geom& g, const Tile& tl, const scalar_t* xg, const scalar_t* m,
                           int64_t ld, scalar_t* buf) {
  for (int64_t c = 0; c < g.cin_g; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t q = i * g.kw + j;
        build_row(g, tl, i, j, xg + c * g.H * g.W, m ? m + q * g.L : nullptr,
                  buf + (c * g.P + q) * ld);
      }
}

// All rows: dxg(input location of col[c, q](t0 + t)) += buf[(c * P + q) * ld + t] (buf's border
// columns may be zeroed).
template <typename scalar_t>
NSL_INLINE void scatter_cols(const Geom& g, const Tile& tl, scalar_t* dxg, int64_t ld,
                             scalar_t* buf) {
  for (int64_t c = 0; c < g.cin_g; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        scatter_row(g, tl, i, j, dxg + c * g.H * g.W, buf + (c * g.P + i * g.kw + j) * ld);
}

// ---- Full layout: the per-location P x P products -----------------------------------------
// Generic versions work on chunks of tile locations (so the touched rows stay in L1); for the
// common P (3x3, 2x2, 5x5 kernels) register-blocked versions work on one SIMD vector of
// locations at a time, keeping a whole column of src (or of dM) in registers.

// Chunk of tile locations processed at once by the generic P x P loops.
constexpr int64_t kChunk = 64;

#if NSL_VECTOR_EXT
#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers are always inlined, so the baseline clone's vector-return ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// 32-byte vectors of the GCC vector extension; loads and stores go through memcpy, so they
// need no alignment and do not break strict aliasing (they compile to plain vector moves).
// Vector bytes of the register-blocked loops: 64 (AVX-512) where the CPU has it, else 32.
// The full layout's P x P products are FMA-bound, so they gain from 512-bit vectors (unlike the
// memory-bound element-wise loops).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// (the x86-64-v4 features, so that the clone selected is the AVX-512 one)
const bool g_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
#else
const bool g_avx512 = false;
#endif

template <typename V, typename scalar_t>
NSL_INLINE V vload(const scalar_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename scalar_t>
NSL_INLINE void vstore(scalar_t* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

#endif

// dst[c, a](t) = sum_b M_ab(t) src[c, b](t) for t in [tb, te); M_ab = Mt[a * sa + b * sb].
template <typename scalar_t>
NSL_INLINE void mix_generic(int64_t P, int64_t cin, const scalar_t* __restrict Mt, int64_t sa,
                            int64_t sb, const scalar_t* __restrict src, scalar_t* __restrict dst,
                            int64_t ld, int64_t tb, int64_t te) {
  for (int64_t t0 = tb; t0 < te; t0 += kChunk) {
    const int64_t n = std::min(kChunk, te - t0);
    for (int64_t c = 0; c < cin; ++c) {
      const scalar_t* sc = src + c * P * ld + t0;
      for (int64_t a = 0; a < P; ++a) {
        scalar_t* __restrict d = dst + (c * P + a) * ld + t0;
        const scalar_t* Ma = Mt + a * sa + t0;
        {
          const scalar_t* __restrict m0 = Ma;
          const scalar_t* __restrict s0 = sc;
          for (int64_t t = 0; t < n; ++t) d[t] = m0[t] * s0[t];
        }
        int64_t b = 1;
        for (; b + 2 < P; b += 3) {  // three positions per pass: fewer loads/stores of d
          const scalar_t* __restrict m0 = Ma + b * sb;
          const scalar_t* __restrict m1 = m0 + sb;
          const scalar_t* __restrict m2 = m1 + sb;
          const scalar_t* __restrict s0 = sc + b * ld;
          const scalar_t* __restrict s1 = s0 + ld;
          const scalar_t* __restrict s2 = s1 + ld;
          for (int64_t t = 0; t < n; ++t) d[t] += m0[t] * s0[t] + m1[t] * s1[t] + m2[t] * s2[t];
        }
        for (; b < P; ++b) {
          const scalar_t* __restrict m0 = Ma + b * sb;
          const scalar_t* __restrict s0 = sc + b * ld;
          for (int64_t t = 0; t < n; ++t) d[t] += m0[t] * s0[t];
        }
      }
    }
  }
}

#if NSL_VECTOR_EXT
// Same with P fixed at compile time, on whole vectors; returns the first location not done.
// The vector of M values for each (a, b) is first packed contiguously (pack: P * P * VL), so
// the unrolled loops address it with constant offsets (81 separately strided pointers would
// not fit in registers).
template <typename scalar_t, int P, int VB>
NSL_INLINE int64_t mix_fixed(int64_t cin, const scalar_t* Mt, int64_t sa, int64_t sb,
                             const scalar_t* src, scalar_t* dst, int64_t ld, int64_t len,
                             scalar_t* __restrict pack) {
  typedef scalar_t V __attribute__((vector_size(VB)));
  constexpr int64_t VL = VB / sizeof(scalar_t);
  int64_t t = 0;
  for (; t + VL <= len; t += VL) {
    for (int a = 0; a < P; ++a)
      for (int b = 0; b < P; ++b)
        std::memcpy(pack + (a * P + b) * VL, Mt + a * sa + b * sb + t, sizeof(V));
    const scalar_t* sp = src + t;
    scalar_t* dp = dst + t;
    for (int64_t c = 0; c < cin; ++c, sp += P * ld, dp += P * ld) {
      V s[P];
#pragma GCC unroll 32
      for (int b = 0; b < P; ++b) s[b] = vload<V>(sp + b * ld);
#pragma GCC unroll 32
      for (int a = 0; a < P; ++a) {
        V acc = vload<V>(pack + a * P * VL) * s[0];
#pragma GCC unroll 32
        for (int b = 1; b < P; ++b) acc += vload<V>(pack + (a * P + b) * VL) * s[b];
        vstore(dp + a * ld, acc);
      }
    }
  }
  return t;
}
#endif

// Full layout mixing: dst[c, a](t) = sum_b M_ab(t) src[c, b](t) for t in [0, len), with
// M_ab = Mt[(a * P + b) * L] (trans = false) or Mt[(b * P + a) * L] (trans = true); Mt points
// at M[n, 0, 0, t0]; src and dst rows have leading dimension ld.
template <typename scalar_t>
NSL_INLINE void mix_positions(const Geom& g, const scalar_t* Mt, bool trans, int64_t len,
                              const scalar_t* src, scalar_t* dst, int64_t ld, scalar_t* pack) {
  const int64_t P = g.P, L = g.L;
  const int64_t sa = trans ? L : P * L, sb = trans ? P * L : L;
  int64_t done = 0;
#if NSL_VECTOR_EXT
  if (P == 9 && g_avx512) {
    done = mix_fixed<scalar_t, 9, 64>(g.cin_g, Mt, sa, sb, src, dst, ld, len, pack);
  } else if (P == 9) {
    done = mix_fixed<scalar_t, 9, 32>(g.cin_g, Mt, sa, sb, src, dst, ld, len, pack);
  } else if (P == 4) {
    done = mix_fixed<scalar_t, 4, 32>(g.cin_g, Mt, sa, sb, src, dst, ld, len, pack);
  } else if (P == 25) {
    done = mix_fixed<scalar_t, 25, 32>(g.cin_g, Mt, sa, sb, src, dst, ld, len, pack);
  }
#endif
  mix_generic(P, g.cin_g, Mt, sa, sb, src, dst, ld, done, len);
}

// dM[p, q](t) += sum_c H[c, p](t) C[c, q](t) for t in [tb, te); dMt rows L apart.
template <typename scalar_t>
NSL_INLINE void dM_generic(int64_t P, int64_t L, int64_t cin, scalar_t* __restrict dMt,
                           const scalar_t* __restrict Hb, const scalar_t* __restrict Cb,
                           int64_t ld, int64_t tb, int64_t te) {
  for (int64_t t0 = tb; t0 < te; t0 += kChunk) {
    const int64_t n = std::min(kChunk, te - t0);
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t q = 0; q < P; ++q) {
        scalar_t* __restrict d = dMt + (p * P + q) * L + t0;
        int64_t c = 0;
        for (; c + 1 < cin; c += 2) {
          const scalar_t* __restrict h0 = Hb + (c * P + p) * ld + t0;
          const scalar_t* __restrict h1 = h0 + P * ld;
          const scalar_t* __restrict c0 = Cb + (c * P + q) * ld + t0;
          const scalar_t* __restrict c1 = c0 + P * ld;
          for (int64_t t = 0; t < n; ++t) d[t] += h0[t] * c0[t] + h1[t] * c1[t];
        }
        for (; c < cin; ++c) {
          const scalar_t* __restrict h0 = Hb + (c * P + p) * ld + t0;
          const scalar_t* __restrict c0 = Cb + (c * P + q) * ld + t0;
          for (int64_t t = 0; t < n; ++t) d[t] += h0[t] * c0[t];
        }
      }
    }
  }
}

#if NSL_VECTOR_EXT
// Same with P fixed, on whole vectors: a row dM[p, :] of accumulators stays in registers while
// c runs. The vectors of H and C are first packed contiguously (pack: 2 * cin * P * VL) so the
// unrolled loops use constant offsets. Returns the first location not done.
template <typename scalar_t, int P, int VB>
NSL_INLINE int64_t dM_fixed(int64_t L, int64_t cin, scalar_t* dMt, const scalar_t* Hb,
                            const scalar_t* Cb, int64_t ld, int64_t len,
                            scalar_t* __restrict pack) {
  typedef scalar_t V __attribute__((vector_size(VB)));
  constexpr int64_t VL = VB / sizeof(scalar_t);
  const int64_t K = cin * P;
  scalar_t* __restrict hp = pack;
  scalar_t* __restrict cp = pack + K * VL;
  int64_t t = 0;
  for (; t + VL <= len; t += VL) {
    for (int64_t r = 0; r < K; ++r) {
      std::memcpy(hp + r * VL, Hb + r * ld + t, sizeof(V));
      std::memcpy(cp + r * VL, Cb + r * ld + t, sizeof(V));
    }
    for (int p = 0; p < P; ++p) {
      V acc[P];
#pragma GCC unroll 32
      for (int q = 0; q < P; ++q) acc[q] = vload<V>(dMt + (p * P + q) * L + t);
      const scalar_t* hc = hp + p * VL;
      const scalar_t* cc = cp;
      for (int64_t c = 0; c < cin; ++c, hc += P * VL, cc += P * VL) {
        const V h = vload<V>(hc);
#pragma GCC unroll 32
        for (int q = 0; q < P; ++q) acc[q] += h * vload<V>(cc + q * VL);
      }
#pragma GCC unroll 32
      for (int q = 0; q < P; ++q) vstore(dMt + (p * P + q) * L + t, acc[q]);
    }
  }
  return t;
}
#endif

// Full layout: dMt[(p * P + q) * L + t] += sum_c Hb[c, p](t) Cb[c, q](t), t in [0, len).
template <typename scalar_t>
NSL_INLINE void accumulate_dM(const Geom& g, scalar_t* dMt, int64_t len, const scalar_t* Hb,
                              const scalar_t* Cb, int64_t ld, scalar_t* pack) {
  int64_t done = 0;
#if NSL_VECTOR_EXT
  if (g.P == 9 && g_avx512) {
    done = dM_fixed<scalar_t, 9, 64>(g.L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 9) {
    done = dM_fixed<scalar_t, 9, 32>(g.L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 4) {
    done = dM_fixed<scalar_t, 4, 32>(g.L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 25) {
    done = dM_fixed<scalar_t, 25, 32>(g.L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  }
#endif
  dM_generic(g.P, g.L, g.cin_g, dMt, Hb, Cb, ld, done, len);
}

// Diagonal backward, shift path, one row (c, q) of a tile, fused into a single loop:
//   dm[t] += H[t] col(t),  C[t] = m[t] col(t) (the forward tile, for dW),
//   dx(input location of col(t)) += m[t] H[t].
// H's border columns are zeroed first (they multiply zero columns), so the bulk loop needs no
// masking; C gets zeros outside the image afterwards.
template <typename scalar_t, bool DM, bool DW, bool DX>
NSL_INLINE void diag_bwd_bulk(const scalar_t* __restrict src, const scalar_t* __restrict m,
                              const scalar_t* __restrict h, scalar_t* __restrict dm,
                              scalar_t* __restrict cr, scalar_t* __restrict dx, int64_t lo,
                              int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) {
    const scalar_t v = src[t];
    if (DM) dm[t] += h[t] * v;
    if (DW) cr[t] = m[t] * v;
    if (DX) dx[t] += m[t] * h[t];
  }
}

template <typename scalar_t>
NSL_INLINE void diag_bwd_row_shift(const Geom& g, const Tile& tl, int64_t i, int64_t j,
                                   const scalar_t* xc, const scalar_t* m, scalar_t* h,
                                   scalar_t* dm, scalar_t* cr, scalar_t* dxc) {
  zero_border_cols(g, tl, j, h);
  const Bulk b = bulk_range(g, tl, i, j);
  const scalar_t* src = xc + tl.t0 + b.shift;  // indexed by tile offset
  scalar_t* dx = dxc ? dxc + tl.t0 + b.shift : nullptr;
  switch ((dm ? 4 : 0) | (cr ? 2 : 0) | (dxc ? 1 : 0)) {
    case 1: diag_bwd_bulk<scalar_t, false, false, true>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 2: diag_bwd_bulk<scalar_t, false, true, false>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 3: diag_bwd_bulk<scalar_t, false, true, true>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 4: diag_bwd_bulk<scalar_t, true, false, false>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 5: diag_bwd_bulk<scalar_t, true, false, true>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 6: diag_bwd_bulk<scalar_t, true, true, false>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    case 7: diag_bwd_bulk<scalar_t, true, true, true>(src, m, h, dm, cr, dx, b.lo, b.hi); break;
    default: break;
  }
  if (cr) {  // the forward's modulated row: m * 0 where the column is padding
    pad_fill(m, cr, 0, b.lo);
    pad_fill(m, cr, b.hi, tl.len);
    pad_border_cols(g, tl, j, m, cr);
  }
}

// ------------------------------------------------------------------------------------------
// Per-tile work
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Args {
  const Geom* g;
  bool full;
  const scalar_t* x;    // [N, C_in, H, W]
  const scalar_t* w;    // [C_out, cin_g * P] = [groups, cout_g, K]
  const scalar_t* wt;   // backward only: W_g^T, [groups, K, cout_g]
  const scalar_t* sim;  // [N, P, L] or [N, P, P, L]
  int64_t sim_stride;   // elements per image of sim
};

// Workspace of one thread: nbuf tiles of K * T elements, the packing area of the fixed-P loops
// (2 * K * 16 + P * P * 16 elements: 16 is the longest vector, 16 floats), and a transposed tile
// of grad_out (T * cout_g).
int64_t workspace_size(const Geom& g, int64_t nbuf) {
  return nbuf * g.K * g.T + 2 * g.K * 16 + g.P * g.P * 16 + g.T * g.cout_g;
}

// out[n, :, t0:t0+len] for all groups. ws: workspace_size(g, 2) elements.
template <typename scalar_t>
NSL_MULTIVERSION void forward_tile(const Args<scalar_t>& a, int64_t n, int64_t tile, scalar_t* out,
                                   scalar_t* ws, Tile& tl) {
  const Geom& g = *a.g;
  const int64_t t0 = tile * g.T, ld = g.T;
  tl.set(g, t0, std::min(g.T, g.L - t0));
  const scalar_t* simt = a.sim + n * a.sim_stride + t0;
  scalar_t* B = ws;
  scalar_t* C = ws + g.K * g.T;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const scalar_t* xg = a.x + (n * g.C_in + grp * g.cin_g) * g.H * g.W;
    if (a.full) {
      build_cols<scalar_t>(g, tl, xg, nullptr, ld, C);
      mix_positions<scalar_t>(g, simt, false, tl.len, C, B, ld, ws + 2 * g.K * g.T);
    } else {
      build_cols<scalar_t>(g, tl, xg, simt, ld, B);
    }
    const scalar_t* wg = a.w + grp * g.cout_g * g.K;
    scalar_t* og = out + (n * g.C_out + grp * g.cout_g) * g.L + t0;
    gemm_nn<scalar_t>(g.cout_g, tl.len, g.K, wg, g.K, B, ld, false, og, g.L);
  }
}

// Backward for one tile of image n. gout: [N, C_out, L]; dxn: [C_in, H, W] target for this
// image (or a per-thread buffer); dWT: [groups, K, cout_g] accumulator of dW^T; dsim: [N, ...]
// like sim; null pointers mark gradients not needed. ws: workspace_size(g, 3) elements.
template <typename scalar_t>
NSL_MULTIVERSION void backward_tile(const Args<scalar_t>& a, const scalar_t* gout, int64_t n,
                                    int64_t tile, scalar_t* dxn, scalar_t* dW, scalar_t* dsim,
                                    scalar_t* ws, Tile& tl) {
  const Geom& g = *a.g;
  const int64_t t0 = tile * g.T, ld = g.T, HW = g.H * g.W;
  tl.set(g, t0, std::min(g.T, g.L - t0));
  const int64_t len = tl.len;
  const scalar_t* simt = a.sim + n * a.sim_stride + t0;
  scalar_t* dsimt = dsim ? dsim + n * a.sim_stride + t0 : nullptr;
  scalar_t* C = ws;
  scalar_t* Hb = ws + g.K * g.T;
  scalar_t* X = ws + 2 * g.K * g.T;
  scalar_t* pack = ws + 3 * g.K * g.T;
  scalar_t* gT = pack + 2 * g.K * 16 + g.P * g.P * 16;  // [len, cout_g]
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const scalar_t* xg = a.x + (n * g.C_in + grp * g.cin_g) * HW;
    const scalar_t* gg = gout + (n * g.C_out + grp * g.cout_g) * g.L + t0;
    scalar_t* dxg = dxn ? dxn + grp * g.cin_g * HW : nullptr;
    if (dxg || dsimt) {  // H = W_g^T g_tile: [K, len]
      gemm_nn<scalar_t>(g.K, len, g.cout_g, a.wt + grp * g.K * g.cout_g, g.cout_g, gg, g.L, false,
                        Hb, ld);
    }
    const scalar_t* Bw = C;  // the tile W was multiplied with in the forward pass
    if (a.full) {
      if (dsimt || dW) build_cols<scalar_t>(g, tl, xg, nullptr, ld, C);
      if (dsimt) accumulate_dM<scalar_t>(g, dsimt, len, Hb, C, ld, pack);
      if (dxg) {
        mix_positions<scalar_t>(g, simt, true, len, Hb, X, ld, pack);  // sum_p M[p, q] H[c, p]
        scatter_cols<scalar_t>(g, tl, dxg, ld, X);
      }
      if (dW) {
        mix_positions<scalar_t>(g, simt, false, len, C, X, ld, pack);  // sum_q M[p, q] C[c, q]
        Bw = X;
      }
    } else {
      // One pass over the rows, each staying in L1: build C, dm += H C, C *= m (for dW),
      // H *= m and scatter it into dx.
      for (int64_t c = 0; c < g.cin_g; ++c) {
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t q = i * g.kw + j;
            scalar_t* __restrict cr = C + (c * g.P + q) * ld;
            scalar_t* __restrict hr = Hb + (c * g.P + q) * ld;
            const scalar_t* __restrict mq = simt + q * g.L;
            if (g.shift_path) {
              diag_bwd_row_shift<scalar_t>(g, tl, i, j, xg + c * HW, mq, hr,
                                           dsimt ? dsimt + q * g.L : nullptr, dW ? cr : nullptr,
                                           dxg ? dxg + c * HW : nullptr);
              continue;
            }
            if (dsimt || dW) build_row<scalar_t>(g, tl, i, j, xg + c * HW, nullptr, cr);
            if (dsimt) {
              scalar_t* __restrict d = dsimt + q * g.L;
              for (int64_t t = 0; t < len; ++t) d[t] += hr[t] * cr[t];
            }
            if (dW) {
              for (int64_t t = 0; t < len; ++t) cr[t] *= mq[t];
            }
            if (dxg) {
              for (int64_t t = 0; t < len; ++t) hr[t] *= mq[t];
              scatter_row<scalar_t>(g, tl, i, j, dxg + c * HW, hr);
            }
          }
        }
      }
    }
    if (dW) {  // dW_g^T += Bw g_tile^T: [K, cout_g]
      for (int64_t o = 0; o < g.cout_g; ++o)
        for (int64_t t = 0; t < len; ++t) gT[t * g.cout_g + o] = gg[o * g.L + t];
      gemm_nn<scalar_t>(g.K, g.cout_g, len, Bw, ld, gT, g.cout_g, true, dW + grp * g.K * g.cout_g,
                        g.cout_g);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
                  const Geom& g, bool& full) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && sim.device().is_cpu(),
              "dynamic_ns_conv: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.scalar_type() == sim.scalar_type(),
              "dynamic_ns_conv: x, weight and sim must share a dtype");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && sim.is_contiguous(),
              "dynamic_ns_conv: contiguous tensors expected");
  if (sim.dim() == 4) {
    full = false;
    TORCH_CHECK(sim.size(0) == g.N && sim.size(1) == g.P && sim.size(2) == g.Ho &&
                    sim.size(3) == g.Wo,
                "diagonal sim must be [N, P, H_out, W_out] = [", g.N, ", ", g.P, ", ", g.Ho, ", ",
                g.Wo, "], got ", sim.sizes());
  } else if (sim.dim() == 5) {
    full = true;
    TORCH_CHECK(sim.size(0) == g.N && sim.size(1) == g.P && sim.size(2) == g.P &&
                    sim.size(3) == g.Ho && sim.size(4) == g.Wo,
                "full sim must be [N, P, P, H_out, W_out] = [", g.N, ", ", g.P, ", ", g.P, ", ",
                g.Ho, ", ", g.Wo, "], got ", sim.sizes());
  } else {
    TORCH_CHECK(false, "sim must be 4-D (diagonal) or 5-D (full), got ", sim.dim(), "-D");
  }
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
                   std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation, int64_t groups) {
  const Geom g = make_geom(x, w, stride, padding, dilation, groups, x.element_size());
  bool full = false;
  check_inputs(x, w, sim, g, full);
  auto out = at::empty({g.N, g.C_out, g.Ho, g.Wo}, x.options());
  if (g.N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_ns_conv_forward", [&] {
    Args<scalar_t> a{&g, full, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), nullptr,
                     sim.data_ptr<scalar_t>(), sim.numel() / g.N};
    scalar_t* o = out.data_ptr<scalar_t>();
    // One work item per image, or per (image, tile) when images are fewer than threads.
    const bool per_image = g.N >= at::get_num_threads();
    const int64_t items = per_image ? g.N : g.N * g.ntiles;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ws(workspace_size(g, 2));
      Tile tl;
      for (int64_t it = begin; it < end; ++it) {
        if (per_image) {
          for (int64_t tile = 0; tile < g.ntiles; ++tile)
            forward_tile<scalar_t>(a, it, tile, o, ws.data(), tl);
        } else {
          forward_tile<scalar_t>(a, it / g.ntiles, it % g.ntiles, o, ws.data(), tl);
        }
      }
    });
  });
  return out;
}

// Returns [dx, dweight, dsim]; a gradient not asked for is an undefined tensor (None).
std::vector<at::Tensor> backward(const at::Tensor& gout_in, const at::Tensor& x,
                                 const at::Tensor& w, const at::Tensor& sim,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                 std::vector<int64_t> dilation, int64_t groups, bool need_dx,
                                 bool need_dw, bool need_dsim) {
  const Geom g = make_geom(x, w, stride, padding, dilation, groups, x.element_size());
  bool full = false;
  check_inputs(x, w, sim, g, full);
  const at::Tensor gout = gout_in.contiguous();
  TORCH_CHECK(gout.scalar_type() == x.scalar_type() && gout.device().is_cpu() &&
                  gout.dim() == 4 && gout.size(0) == g.N && gout.size(1) == g.C_out &&
                  gout.size(2) == g.Ho && gout.size(3) == g.Wo,
              "grad_out must be a CPU tensor of shape [N, C_out, H_out, W_out] and x's dtype");
  at::Tensor dx, dw, dsim;
  if (need_dx) dx = at::zeros_like(x);
  if (need_dsim) dsim = at::zeros_like(sim);
  if (need_dw) dw = at::zeros_like(w);
  if (g.N == 0 || !(need_dx || need_dw || need_dsim)) return {dx, dw, dsim};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_ns_conv_backward", [&] {
    // W_g^T for the H = W_g^T g GEMMs (all GEMMs here are untransposed).
    const at::Tensor wt = w.view({g.groups, g.cout_g, g.K}).transpose(1, 2).contiguous();
    Args<scalar_t> a{&g, full, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                     wt.data_ptr<scalar_t>(), sim.data_ptr<scalar_t>(), sim.numel() / g.N};
    const scalar_t* go = gout.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dsp = need_dsim ? dsim.data_ptr<scalar_t>() : nullptr;
    const int64_t nthreads = at::get_num_threads();
    const int64_t wsize = g.C_out * g.K, img = g.C_in * g.H * g.W;
    // Per-thread accumulators of dW^T ([groups, K, cout_g] each), summed at the end.
    at::Tensor dw_acc;
    if (need_dw) dw_acc = at::zeros({nthreads, wsize}, w.options());
    scalar_t* dwa = need_dw ? dw_acc.data_ptr<scalar_t>() : nullptr;

    if (g.N >= nthreads) {
      // Each image belongs to one thread: dx[n] is written without races.
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> ws(workspace_size(g, 3));
        Tile tl;
        scalar_t* dWt = dwa ? dwa + at::get_thread_num() * wsize : nullptr;
        for (int64_t n = begin; n < end; ++n)
          for (int64_t tile = 0; tile < g.ntiles; ++tile)
            backward_tile<scalar_t>(a, go, n, tile, dxp ? dxp + n * img : nullptr, dWt, dsp,
                                    ws.data(), tl);
      });
    } else {
      // Fewer images than threads: split each image's tiles across threads. Tiles overlap in
      // the input (kernel halo), so each thread scatters into its own dx buffer.
      at::Tensor dx_acc;
      if (need_dx) dx_acc = at::empty({nthreads, img}, x.options());
      for (int64_t n = 0; n < g.N; ++n) {
        if (need_dx) dx_acc.zero_();
        scalar_t* dxa = need_dx ? dx_acc.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, g.ntiles, 1, [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> ws(workspace_size(g, 3));
          Tile tl;
          const int64_t tid = at::get_thread_num();
          scalar_t* dWt = dwa ? dwa + tid * wsize : nullptr;
          for (int64_t tile = begin; tile < end; ++tile)
            backward_tile<scalar_t>(a, go, n, tile, dxa ? dxa + tid * img : nullptr, dWt, dsp,
                                    ws.data(), tl);
        });
        if (need_dx) dx.select(0, n).view({-1}).copy_(dx_acc.sum(0));
      }
    }
    if (need_dw) {
      dw.view({g.groups, g.cout_g, g.K})
          .copy_(dw_acc.sum(0).view({g.groups, g.K, g.cout_g}).transpose(1, 2));
    }
  });
  return {dx, dw, dsim};
}

// Sets the bytes targeted per column tile; returns the previous value.
int64_t set_tile_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "tile bytes must be positive");
  const int64_t old = g_tile_bytes;
  g_tile_bytes = bytes;
  return old;
}

// Sets the fewest output locations per tile; returns the previous value.
int64_t set_min_tile(int64_t locations) {
  TORCH_CHECK(locations > 0, "the minimum tile length must be positive");
  const int64_t old = g_min_tile;
  g_min_tile = locations;
  return old;
}

// The GEMM backends compiled in and found at load time.
std::vector<std::string> gemm_backends() {
  std::vector<std::string> r;
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  r.push_back("brgemm");
#endif
#if NSL_DIRECT_BLAS
  if (sgemm_ != nullptr && dgemm_ != nullptr) r.push_back("blas");
#endif
  r.push_back("at::mm");
  return r;
}

// Testing / benchmarking switch: 0 = best available, 1 = BLAS only, 2 = at::mm only. Returns
// the previous value.
int64_t set_gemm_backend(int64_t backend) {
  TORCH_CHECK(backend >= 0 && backend <= 2, "backend must be 0, 1 or 2");
  const int64_t old = g_gemm_backend;
  g_gemm_backend = static_cast<int>(backend);
  return old;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nsl: fused CPU kernel for dynamic neural similarity convolution";
  // The kernels touch no Python objects: let other Python threads run meanwhile.
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("forward", &forward, "out = dynamic NS conv(x, weight, sim); sim 4-D diagonal, 5-D full",
        py::arg("x"), py::arg("weight"), py::arg("sim"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), release_gil());
  m.def("backward", &backward, "[dx, dweight, dsim] (None where not needed)", py::arg("grad_out"),
        py::arg("x"), py::arg("weight"), py::arg("sim"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("need_dx"), py::arg("need_dweight"),
        py::arg("need_dsim"), release_gil());
  m.def("set_tile_bytes", &set_tile_bytes,
        "bytes targeted per column tile (tuning); returns the previous value");
  m.def("set_min_tile", &set_min_tile,
        "fewest output locations per column tile (tuning); returns the previous value");
  m.def("gemm_backends", &gemm_backends, "GEMM backends available, fastest first");
  m.def("set_gemm_backend", &set_gemm_backend,
        "testing: 0 best available, 1 BLAS only, 2 at::mm only; returns the previous value");
}
