// nsl CPU kernel: the element-wise work on column tiles (building, scattering, the full layout's
// P x P products, the fused diagonal backward), the per-call arguments and the per-thread
// workspace size; shared by forward.cpp and backward.cpp. Everything here is inlined into the
// multiversioned per-tile functions of those files.
#pragma once

#include <cstring>

#include "geometry.h"

namespace nsl {

// ------------------------------------------------------------------------------------------
// Column tiles, one row (c, q = i * kw + j) at a time
// ------------------------------------------------------------------------------------------

// Bit masks in scalar_t slots: all ones (keep) or all zeros (drop). keep_if(v, mask) is v or +0
// by a bitwise and, which GCC vectorizes (a floating-point select in a loop it does not, under
// -ftrapping-math) and which keeps a non-finite v out of the result (unlike v * 0).
template <typename scalar_t> struct mask_bits;
template <> struct mask_bits<float> { typedef uint32_t type; };
template <> struct mask_bits<double> { typedef uint64_t type; };

template <typename scalar_t>
NSL_INLINE scalar_t keep_if(scalar_t v, const scalar_t* mask) {
  typename mask_bits<scalar_t>::type a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, mask, sizeof b);
  a &= b;
  std::memcpy(&v, &a, sizeof a);
  return v;
}

template <typename scalar_t>
NSL_INLINE void set_mask(scalar_t* slot, bool keep) {
  const typename mask_bits<scalar_t>::type b = keep ? ~typename mask_bits<scalar_t>::type(0) : 0;
  std::memcpy(slot, &b, sizeof b);
}

// colok[j * ld + t]: keep (all ones) where tile location t's output column is inside
// [xlo[j], xhi[j]) (kernel column j reads inside the image), else drop; ld >= the tile's length.
template <typename scalar_t>
NSL_INLINE void column_masks(const Geom& g, const Tile& tl, int64_t ld, scalar_t* colok) {
  for (int64_t j = 0; j < g.kw; ++j) {
    scalar_t* r = colok + j * ld;
    for (const Segment& s : tl.segs)
      for (int64_t x = s.x0; x < s.x1; ++x)
        set_mask(r + s.off + x - s.x0, x >= g.xlo[j] && x < g.xhi[j]);
    for (int64_t t = tl.len; t < ld; ++t) set_mask(r + t, false);
  }
}

// d[t] = (m[t] *) col[c, q](t0 + t) for t in [0, len); xc: input plane of channel c [H, W];
// m (may be null): m[n, q, t0]; okj (may be null): column_masks' row of kernel column j, which
// makes the shift path one select loop instead of a pass per output row over the border columns.
template <typename scalar_t>
NSL_INLINE void build_row(const Geom& g, const Tile& tl, int64_t i, int64_t j,
                          const scalar_t* __restrict xc, const scalar_t* __restrict m,
                          scalar_t* __restrict d, const scalar_t* __restrict okj = nullptr) {
  if (g.shift_path) {
    const Bulk b = bulk_range(g, tl, i, j);
    const scalar_t* __restrict src = xc + tl.t0 + b.shift;
    const bool border = g.xlo[j] > 0 || g.xhi[j] < g.Wo;
    if (m) {
      pad_fill(m, d, 0, b.lo);
      if (border && okj) {
        for (int64_t t = b.lo; t < b.hi; ++t) d[t] = m[t] * keep_if(src[t], okj + t);  // m * 0
      } else {
        for (int64_t t = b.lo; t < b.hi; ++t) d[t] = m[t] * src[t];
        pad_border_cols(g, tl, j, m, d);
      }
      pad_fill(m, d, b.hi, tl.len);
      return;
    }
    for (int64_t t = 0; t < b.lo; ++t) d[t] = 0;
    if (border && okj) {
      for (int64_t t = b.lo; t < b.hi; ++t) d[t] = keep_if(src[t], okj + t);
    } else {
      if (b.hi > b.lo) std::memcpy(d + b.lo, src + b.lo, (b.hi - b.lo) * sizeof(scalar_t));
      zero_border_cols(g, tl, j, d);
    }
    for (int64_t t = b.hi; t < tl.len; ++t) d[t] = 0;
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
// xg: [cin_g, H, W] planes of the group; m (may be null): m[q](t0 + t) at m[q * lm + t]; colok
// (may be null): column_masks of the tile, leading dimension ld.
template <typename scalar_t>
NSL_INLINE void build_cols(const Geom& g, const Tile& tl, const scalar_t* xg, const scalar_t* m,
                           int64_t lm, int64_t ld, scalar_t* buf, const scalar_t* colok = nullptr) {
  for (int64_t c = 0; c < g.cin_g; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t q = i * g.kw + j;
        build_row(g, tl, i, j, xg + c * g.H * g.W, m ? m + q * lm : nullptr,
                  buf + (c * g.P + q) * ld, colok ? colok + j * ld : nullptr);
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
// 32-byte vectors of the GCC vector extension (loads and stores: vload / vstore, geometry.h).
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
// Same with P fixed at compile time, on NV whole vectors of locations from t (NV = 2: each cache
// line of the 2 * P * cin rows read or written serves both vectors before it leaves L1, where one
// vector per step fetched every line twice). The vectors of M for each (a, b) are first packed
// contiguously (pack: NV * P * P * VL), so the unrolled loops address them with constant offsets
// (81 separately strided pointers would not fit in registers).
template <typename scalar_t, int P, int VB, int NV>
NSL_INLINE void mix_fixed_step(int64_t cin, const scalar_t* Mt, int64_t sa, int64_t sb,
                               const scalar_t* src, scalar_t* dst, int64_t ld, int64_t t,
                               scalar_t* __restrict pack) {
  typedef scalar_t V __attribute__((vector_size(VB)));
  constexpr int64_t VL = VB / sizeof(scalar_t);
  for (int v = 0; v < NV; ++v)
    for (int a = 0; a < P; ++a)
      for (int b = 0; b < P; ++b)
        std::memcpy(pack + ((v * P + a) * P + b) * VL, Mt + a * sa + b * sb + t + v * VL,
                    sizeof(V));
  const scalar_t* sp = src + t;
  scalar_t* dp = dst + t;
  for (int64_t c = 0; c < cin; ++c, sp += P * ld, dp += P * ld) {
    for (int v = 0; v < NV; ++v) {
      const scalar_t* pv = pack + v * P * P * VL;
      V s[P];
#pragma GCC unroll 32
      for (int b = 0; b < P; ++b) s[b] = vload<V>(sp + b * ld + v * VL);
#pragma GCC unroll 32
      for (int a = 0; a < P; ++a) {
        V acc = vload<V>(pv + a * P * VL) * s[0];
#pragma GCC unroll 32
        for (int b = 1; b < P; ++b) acc += vload<V>(pv + (a * P + b) * VL) * s[b];
        vstore(dp + a * ld + v * VL, acc);
      }
    }
  }
}

// mix_fixed_step over [0, len) in steps of two vectors, then one; returns the first location not
// done.
template <typename scalar_t, int P, int VB>
NSL_INLINE int64_t mix_fixed(int64_t cin, const scalar_t* Mt, int64_t sa, int64_t sb,
                             const scalar_t* src, scalar_t* dst, int64_t ld, int64_t len,
                             scalar_t* pack) {
  constexpr int64_t VL = VB / sizeof(scalar_t);
  int64_t t = 0;
  for (; t + 2 * VL <= len; t += 2 * VL)
    mix_fixed_step<scalar_t, P, VB, 2>(cin, Mt, sa, sb, src, dst, ld, t, pack);
  for (; t + VL <= len; t += VL)
    mix_fixed_step<scalar_t, P, VB, 1>(cin, Mt, sa, sb, src, dst, ld, t, pack);
  return t;
}
#endif

// Full layout mixing: dst[c, a](t) = sum_b M_ab(t) src[c, b](t) for t in [0, len), with
// M_ab = Mt[(a * P + b) * L] (trans = false) or Mt[(b * P + a) * L] (trans = true); Mt points
// at M[n, 0, 0, t0] or a tile-local copy, rows L apart; src and dst rows have leading dimension ld.
template <typename scalar_t>
NSL_INLINE void mix_positions(const Geom& g, const scalar_t* Mt, int64_t L, bool trans,
                              int64_t len, const scalar_t* src, scalar_t* dst, int64_t ld,
                              scalar_t* pack) {
  const int64_t P = g.P;
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
// Channels per block of dM_fixed_step.
constexpr int64_t kDMBlock = 8;

// Same with P fixed, on NV whole vectors of locations from t: a row dM[p, :] of accumulators
// stays in registers while c runs over a block of kDMBlock channels, whose rows of H and C are
// first packed contiguously for the NV vectors (pack: 2 * NV * kDMBlock * P * VL; NV = 2: each of
// their cache lines is fetched once for both vectors, and the packed block stays in L1).
template <typename scalar_t, int P, int VB, int NV>
NSL_INLINE void dM_fixed_step(int64_t L, int64_t cin, scalar_t* dMt, const scalar_t* Hb,
                              const scalar_t* Cb, int64_t ld, int64_t t,
                              scalar_t* __restrict pack) {
  typedef scalar_t V __attribute__((vector_size(VB)));
  constexpr int64_t VL = VB / sizeof(scalar_t);
  for (int64_t c0 = 0; c0 < cin; c0 += kDMBlock) {
    const int64_t cb = std::min(kDMBlock, cin - c0), rows = cb * P;
    scalar_t* __restrict hp = pack;                 // [NV][rows][VL]
    scalar_t* __restrict cp = pack + NV * rows * VL;  // [NV][rows][VL]
    for (int64_t r = 0; r < rows; ++r)
      for (int v = 0; v < NV; ++v) {
        std::memcpy(hp + (v * rows + r) * VL, Hb + (c0 * P + r) * ld + t + v * VL, sizeof(V));
        std::memcpy(cp + (v * rows + r) * VL, Cb + (c0 * P + r) * ld + t + v * VL, sizeof(V));
      }
    for (int v = 0; v < NV; ++v) {
      scalar_t* dv = dMt + t + v * VL;
      for (int p = 0; p < P; ++p) {
        V acc[P];
#pragma GCC unroll 32
        for (int q = 0; q < P; ++q) acc[q] = vload<V>(dv + (p * P + q) * L);
        const scalar_t* hc = hp + (v * rows + p) * VL;
        const scalar_t* cc = cp + v * rows * VL;
        for (int64_t c = 0; c < cb; ++c, hc += P * VL, cc += P * VL) {
          const V h = vload<V>(hc);
#pragma GCC unroll 32
          for (int q = 0; q < P; ++q) acc[q] += h * vload<V>(cc + q * VL);
        }
#pragma GCC unroll 32
        for (int q = 0; q < P; ++q) vstore(dv + (p * P + q) * L, acc[q]);
      }
    }
  }
}

// dM_fixed_step over [0, len) in steps of two vectors, then one; returns the first location not
// done.
template <typename scalar_t, int P, int VB>
NSL_INLINE int64_t dM_fixed(int64_t L, int64_t cin, scalar_t* dMt, const scalar_t* Hb,
                            const scalar_t* Cb, int64_t ld, int64_t len, scalar_t* pack) {
  constexpr int64_t VL = VB / sizeof(scalar_t);
  int64_t t = 0;
  for (; t + 2 * VL <= len; t += 2 * VL)
    dM_fixed_step<scalar_t, P, VB, 2>(L, cin, dMt, Hb, Cb, ld, t, pack);
  for (; t + VL <= len; t += VL)
    dM_fixed_step<scalar_t, P, VB, 1>(L, cin, dMt, Hb, Cb, ld, t, pack);
  return t;
}
#endif

// Full layout: dMt[(p * P + q) * L + t] += sum_c Hb[c, p](t) Cb[c, q](t), t in [0, len).
template <typename scalar_t>
NSL_INLINE void accumulate_dM(const Geom& g, scalar_t* dMt, int64_t L, int64_t len,
                              const scalar_t* Hb, const scalar_t* Cb, int64_t ld, scalar_t* pack) {
  int64_t done = 0;
#if NSL_VECTOR_EXT
  if (g.P == 9 && g_avx512) {
    done = dM_fixed<scalar_t, 9, 64>(L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 9) {
    done = dM_fixed<scalar_t, 9, 32>(L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 4) {
    done = dM_fixed<scalar_t, 4, 32>(L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  } else if (g.P == 25) {
    done = dM_fixed<scalar_t, 25, 32>(L, g.cin_g, dMt, Hb, Cb, ld, len, pack);
  }
#endif
  dM_generic(g.P, L, g.cin_g, dMt, Hb, Cb, ld, done, len);
}

// Diagonal backward, shift path, one row (c, q) of a tile, fused into a single loop:
//   dm[t] += H[t] col(t),  C[t] = m[t] col(t) (the forward tile, for dW),
//   dx(input location of col(t)) += m[t] H[t].
// On border columns (ok[t] drops, BORDER) col and H count as zero, so the bulk loop needs no
// separate masking passes; C gets m * 0 outside the image afterwards.
template <typename scalar_t, bool DM, bool DW, bool DX, bool BORDER>
NSL_INLINE void diag_bwd_bulk(const scalar_t* __restrict src, const scalar_t* __restrict m,
                              const scalar_t* __restrict h, const scalar_t* __restrict ok,
                              scalar_t* __restrict dm, scalar_t* __restrict cr,
                              scalar_t* __restrict dx, int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) {
    const scalar_t v = BORDER ? keep_if(src[t], ok + t) : src[t];
    const scalar_t hv = BORDER ? keep_if(h[t], ok + t) : h[t];
    if (DM) dm[t] += hv * v;
    if (DW) cr[t] = m[t] * v;
    if (DX) dx[t] += m[t] * hv;
  }
}

// okj: column_masks' row of kernel column j (required on the shift path).
template <typename scalar_t>
NSL_INLINE void diag_bwd_row_shift(const Geom& g, const Tile& tl, int64_t i, int64_t j,
                                   const scalar_t* xc, const scalar_t* m, const scalar_t* h,
                                   scalar_t* dm, scalar_t* cr, scalar_t* dxc,
                                   const scalar_t* okj) {
  const Bulk b = bulk_range(g, tl, i, j);
  const scalar_t* src = xc + tl.t0 + b.shift;  // indexed by tile offset
  scalar_t* dx = dxc ? dxc + tl.t0 + b.shift : nullptr;
  const bool border = g.xlo[j] > 0 || g.xhi[j] < g.Wo;
#define NSL_BULK(DM, DW, DX)                                                                    \
  if (border) {                                                                                 \
    diag_bwd_bulk<scalar_t, DM, DW, DX, true>(src, m, h, okj, dm, cr, dx, b.lo, b.hi);          \
  } else {                                                                                      \
    diag_bwd_bulk<scalar_t, DM, DW, DX, false>(src, m, h, okj, dm, cr, dx, b.lo, b.hi);         \
  }                                                                                             \
  break
  switch ((dm ? 4 : 0) | (cr ? 2 : 0) | (dxc ? 1 : 0)) {
    case 1: NSL_BULK(false, false, true);
    case 2: NSL_BULK(false, true, false);
    case 3: NSL_BULK(false, true, true);
    case 4: NSL_BULK(true, false, false);
    case 5: NSL_BULK(true, false, true);
    case 6: NSL_BULK(true, true, false);
    case 7: NSL_BULK(true, true, true);
    default: break;
  }
#undef NSL_BULK
  if (cr) {  // the forward's modulated row: m * 0 where the column is padding
    pad_fill(m, cr, 0, b.lo);
    pad_fill(m, cr, b.hi, tl.len);
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

// Leading dimension of the tile-local copies of sim and dsim: T rounded up to 16 elements, plus 16
// where that is a multiple of 128. Rows a power-of-two number of bytes apart share L1 sets: sim's
// own rows, L = 1024 locations (4 KiB) apart at 32 x 32, evicted each other in the loops that
// read them across positions (81 rows of M in the P x P loops; 2 x 9 rows of m and dm for 8 ways).
inline int64_t sim_ld(const Geom& g) {
  const int64_t l = (g.T + 15) / 16 * 16;
  return l % 128 ? l : l + 16;
}

// dst[r * dld + t] = src[r * sld + t] for r < rows, t < len.
template <typename scalar_t>
NSL_INLINE void copy_rows(const scalar_t* src, int64_t sld, scalar_t* dst, int64_t dld,
                          int64_t rows, int64_t len) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * dld, src + r * sld, len * sizeof(scalar_t));
}

// Elements of the packing area of the fixed-P loops: the larger of mix_fixed's (2 vectors of P * P)
// and dM_fixed's (2 * 2 vectors of a block's rows of H and C), in vectors of up to 16 elements.
inline int64_t pack_size(const Geom& g) {
  return std::max(2 * g.P * g.P, 4 * std::min<int64_t>(g.cin_g, 8) * g.P) * 16;
}

// Workspace of one forward thread: nbuf tiles of K * T elements, the packing area of the fixed-P
// loops (pack_size), the column masks (kw * T) and the tile-local copy of m (P * sim_ld).
inline int64_t workspace_size(const Geom& g, int64_t nbuf) {
  return nbuf * g.K * g.T + pack_size(g) + g.kw * g.T + g.P * sim_ld(g);
}


}  // namespace nsl
