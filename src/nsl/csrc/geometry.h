// nsl CPU kernel: build macros, geometry of a convolution and its tiling (shared by all sources).
// The kernel's overview (shapes, formulas, strategy) is at the top of kernel.h.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the ATen ops it calls (compile time)

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>


// The element-wise loops are compiled for several instruction sets and picked at load time
// (GCC function multiversioning), since the extension itself is built for the baseline ISA only:
// NSL_MULTIVERSION on the per-tile entry points, NSL_INLINE on the loops they inline. (An
// x86-64-v4 / AVX-512 clone serves the 512-bit P x P loops of the full layout, see g_avx512.)
// Only the float32 instantiations are multiversioned: float64 (the tests' and the references'
// precision) is compiled once, for the baseline ISA (each entry point is a float and a double
// overload around one NSL_INLINE body; a third of the compile time saved per clone not made).
// -DNSL_SINGLE_ISA compiles one version for the flags given (benchmarks/kernel_phases.py's profiling
// build, with -march=native: a third of the compile time, for the machine it profiles).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 11 && !defined(NSL_SINGLE_ISA)
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

namespace nsl {

#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers (vload, vstore, the loops using them) are always inlined, so the baseline
// clone's vector-return ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// Unaligned load / store of a GCC vector-extension value V (memcpy: no alignment needed, no strict-
// aliasing break; each compiles to one vector move). Used by tiles.h and light_predictor.cpp.
template <typename V, typename T>
NSL_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
NSL_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Bytes targeted for one [K, T] tile buffer (set_tile_bytes) and fewest output locations per
// tile (set_min_tile); read by make_geom.
int64_t set_tile_bytes(int64_t bytes);
int64_t set_min_tile(int64_t locations);

// ------------------------------------------------------------------------------------------
// Geometry and tiling
// ------------------------------------------------------------------------------------------
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

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

// Checks the arguments and derives the geometry and the tile length for elements of elem_size
// bytes (TORCH_CHECK errors name what was expected).
Geom make_geom(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
               int64_t elem_size);

// Checks x, weight and sim against g (device, dtype, contiguity, sim's shape); full is set to
// whether sim has the full layout [N, P, P, H_out, W_out].
void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
                  const Geom& g, bool& full);


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


}  // namespace nsl
