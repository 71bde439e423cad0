// nsl CPU kernel: the fused light predictor, CPU kernels of the operators nsl::light_predictor and
// nsl::light_predictor_backward (defined in Python, nsl/_light_ops.py, with their fake kernels,
// autograd and the PyTorch math used where this library is not loaded).
//
// The light predictor (nsl.LightPredictor) for x [N, C, H, W], positions P = kh * kw:
//   A0 = dw(x)                 depthwise kh x kw conv at the layer's geometry, [N, C, Ho, Wo]
//   Y0 = S0 A0 + T0, R0 = ReLU(Y0)        norm 0 as an affine map per (sample, channel)
//   A1 = Wpw R0                1x1, C -> hid
//   Y1 = S1 A1 + T1, R1 = ReLU(Y1)
//   Z  = Wout R1 + b           1x1, hid -> outc (P, or P * P for full M)
//   sim = tanh(Z), plus 1 on the identity's channels when `identity` (M = I + g: every channel for
//         diagonal M, channels p * (P + 1) for full M)
// Norm modes (kNone.. below): none (S = 1, T = 0); running (BatchNorm with running statistics:
// S = gamma / sqrt(rv + eps), T = beta - rm S); batch (BatchNorm with batch statistics: mean and
// biased variance of A over (n, y) per channel); group (GroupNorm: over a group's channels and y,
// per sample). S and T are kept per (sample, channel) for all of them.
//
// Nothing but sim is written to memory. Each image is cut into tiles of whole output rows; a tile's
// zero-padded input patch, A0, R0, A1, R1 and Z live in a per-thread workspace (sized for L2) and are
// recomputed by every pass that needs them:
//   forward, none/running: one pass. batch/group: pass 1 sums A0 and A0^2 per (n, c) while computing
//     the depthwise conv (the statistics of norm 0), pass 2 those of A1, pass 3 writes sim.
//   backward (dsim given; g = sim - identity, so neither the last 1x1 conv nor tanh is recomputed):
//     dZ = dsim (1 - g^2), dWout += dZ R1^T, db += sum dZ, dY1 = [Y1 > 0] Wout^T dZ,
//     dA1 = S1 dY1 + U1 A1 + V1 (a norm's backward is affine in (dY, A) per (n, c) once the batch sums
//     of dY and dY A are known: U = V = 0 for none/running), dWpw += dA1 R0^T,
//     dY0 = [Y0 > 0] Wpw^T dA1, dA0 = S0 dY0 + U0 A0 + V0, dWdw += dA0 (x) x, dx = dw^T dA0.
//     none/running: one pass. batch/group: pass 1 up to dY1 (sums of dY1, dY1 A1: U1, V1); pass 2 up
//     to dY0 (sums of dY0, dY0 A0: U0, V0), sending S0 dY0 through the depthwise backward; pass 3
//     recomputes only A0 and sends the rest of dA0, U0 A0 + V0, through it (the depthwise backward
//     is linear in dA0).
// Sums are accumulated per thread (double for the norms' sums); dx of an image is written by one
// thread (per-thread buffers when images are fewer than threads), as in backward.cpp.
// float32 / float64; bfloat16 / float16 computed in float32 (the results cast back).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "geometry.h"  // NSL_MULTIVERSION, NSL_INLINE

#if defined(__GNUC__) && !defined(__clang__)
// The tile rows are short: GCC would turn copy and zeroing loops into calls of memcpy/memset
// (measured: 7-13% of the time in libc on CIFAR shapes).
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

namespace nsl {
namespace light {
namespace {

// Norm modes; the codes of nsl/_light_ops.py NORM_CODES.
enum NormMode : int64_t { kNone = 0, kRunning = 1, kBatch = 2, kGroup = 3 };

// Bytes of one thread's workspace the tile length aims at (L2 holds it).
constexpr int64_t kTileBytes = 192 * 1024;
constexpr int kVB = 32;  // vector bytes (AVX2; two SSE registers on the baseline clone)

template <typename T>
struct VecT;
template <>
struct VecT<float> {
  typedef float V __attribute__((vector_size(kVB)));
  typedef int32_t I __attribute__((vector_size(kVB)));
};
template <>
struct VecT<double> {
  typedef double V __attribute__((vector_size(kVB)));
  typedef int64_t I __attribute__((vector_size(kVB)));
};

template <typename T, typename V>
NSL_INLINE T hsum(const V& v) {
  T s = 0;
  for (int l = 0; l < int(sizeof(V) / sizeof(T)); ++l) s += v[l];
  return s;
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// d[k] = s[k] / d[k] = 0 for k < n, as vector moves (GCC would turn the plain loops into calls of
// memcpy/memset, slow for the short rows here).
template <typename T>
NSL_INLINE void copy_row(T* __restrict d, const T* __restrict s, int64_t n) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  int64_t k = 0;
  for (; k + VL <= n; k += VL) vstore(d + k, vload<V>(s + k));
  for (; k < n; ++k) d[k] = s[k];
}

template <typename T>
NSL_INLINE void zero_row(T* __restrict d, int64_t n) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  int64_t k = 0;
  for (; k + VL <= n; k += VL) vstore(d + k, V{});
  for (; k < n; ++k) d[k] = 0;
}

// ------------------------------------------------------------------------------------------
// Geometry and tiling
// ------------------------------------------------------------------------------------------
struct LGeom {
  int64_t N, C, H, W, kh, kw, P, sh, sw, ph, pw, dh, dw, Ho, Wo, L;
  int64_t hid, outc;
  int64_t rows, ntiles;  // output rows per tile, tiles per image
  int64_t Rp, Wp;        // zero-padded input patch of a full tile: rows, columns
  bool flat;             // stride 1: tile buffers use the patch's row pitch (see Work)
  int64_t pitch;         // columns per output row in the tile buffers: Wp (flat) or Wo
  int64_t ld;            // leading dimension of the tile buffers: >= rows * pitch, a multiple of 16
  int64_t psize;         // patch elements per channel (Rp * Wp and slack for vector over-reads)
  int64_t idstep;        // identity on channels c with c % idstep == 0; 0: none
};

LGeom make_lgeom(const at::Tensor& x, const at::Tensor& wdw, const at::Tensor& wpw,
                 const at::Tensor& wout, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, bool identity) {
  TORCH_CHECK(x.dim() == 4, "light_predictor: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "light_predictor: stride, padding and dilation must have two entries");
  LGeom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  TORCH_CHECK(wdw.dim() == 4 && wdw.size(0) == g.C && wdw.size(1) == 1,
              "light_predictor: dw_weight must be [C, 1, kh, kw] with C = ", g.C, ", got ", wdw.sizes());
  g.kh = wdw.size(2); g.kw = wdw.size(3); g.P = g.kh * g.kw;
  TORCH_CHECK(wpw.dim() == 4 && wpw.size(1) == g.C && wpw.size(2) == 1 && wpw.size(3) == 1,
              "light_predictor: pw_weight must be [hidden, C, 1, 1], got ", wpw.sizes());
  g.hid = wpw.size(0);
  TORCH_CHECK(wout.dim() == 4 && wout.size(1) == g.hid && wout.size(2) == 1 && wout.size(3) == 1 &&
                  (wout.size(0) == g.P || wout.size(0) == g.P * g.P),
              "light_predictor: out_weight must be [P or P * P, hidden, 1, 1], got ", wout.sizes());
  g.outc = wout.size(0);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "light_predictor: stride and dilation must be >= 1, padding >= 0");
  const int64_t eh = g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1;
  const int64_t ew = g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1;
  TORCH_CHECK(eh >= 0 && ew >= 0, "light_predictor: kernel larger than the padded input");
  g.Ho = eh / g.sh + 1; g.Wo = ew / g.sw + 1; g.L = g.Ho * g.Wo;
  g.Wp = (g.Wo - 1) * g.sw + g.dw * (g.kw - 1) + 1;
  // Elements of workspace per output location: patch (~sh * sw input locations), A0, R0, D0 per
  // input channel, A1, R1, D1 per hidden channel, Z.
  const int64_t per_loc = g.C * (3 + g.sh * g.sw) + 3 * g.hid + g.outc;
  int64_t rows = std::max<int64_t>(1, kTileBytes / (int64_t(x.element_size()) * per_loc * g.Wo));
  rows = std::min(rows, g.Ho);
  const int64_t threads = at::get_num_threads();
  if (g.N < threads) rows = std::min(rows, (g.Ho + threads - 1) / threads);  // tiles for every thread
  rows = std::max<int64_t>(rows, 1);
  g.ntiles = (g.Ho + rows - 1) / rows;
  g.rows = (g.Ho + g.ntiles - 1) / g.ntiles;  // evened out
  g.ntiles = (g.Ho + g.rows - 1) / g.rows;
  g.Rp = (g.rows - 1) * g.sh + g.dh * (g.kh - 1) + 1;
  g.flat = g.sh == 1 && g.sw == 1;
  g.pitch = g.flat ? g.Wp : g.Wo;
  g.ld = round_up(g.rows * g.pitch, 16);
  g.psize = round_up(g.Rp * g.Wp + g.dw * (g.kw - 1) + 16, 16);
  g.idstep = !identity ? 0 : (g.outc == g.P ? 1 : g.P + 1);
  return g;
}

// ------------------------------------------------------------------------------------------
// Element-wise and small dense kernels on tile rows
// ------------------------------------------------------------------------------------------

// The zero-padded input patch of one channel for the tile of `rows` output rows from y0:
// patch[r * Wp + s] = x[y0 sh - ph + r, s - pw] (0 outside the image), r < (rows - 1) sh + dh (kh - 1) + 1.
template <typename T>
NSL_INLINE void build_patch(const LGeom& g, const T* __restrict xc, int64_t y0, int64_t rows,
                            T* __restrict patch) {
  const int64_t rp = (rows - 1) * g.sh + g.dh * (g.kh - 1) + 1, r0 = y0 * g.sh - g.ph;
  const int64_t lo = std::min(g.pw, g.Wp), hi = std::min(g.Wp, g.pw + g.W);
  for (int64_t r = 0; r < rp; ++r) {
    T* __restrict d = patch + r * g.Wp;
    const int64_t ih = r0 + r;
    if (ih < 0 || ih >= g.H) {
      zero_row(d, g.Wp);
      continue;
    }
    for (int64_t s = 0; s < lo; ++s) d[s] = 0;
    if (hi > lo) copy_row(d + lo, xc + ih * g.W + (lo - g.pw), hi - lo);
    for (int64_t s = std::max(lo, hi); s < g.Wp; ++s) d[s] = 0;
  }
  zero_row(patch + rp * g.Wp, g.psize - rp * g.Wp);  // what the flat loops over-read: finite
}

// out[yr * Wo + x] = sum_{i, j} w[i * kw + j] patch[(yr sh + dh i) * Wp + x sw + dw j].
template <typename T>
NSL_INLINE void dw_rows(const LGeom& g, const T* __restrict patch, const T* __restrict w,
                        int64_t rows, T* __restrict out) {
  const int64_t Wo = g.Wo, Wp = g.Wp;
  for (int64_t yr = 0; yr < rows; ++yr) {
    T* __restrict o = out + yr * Wo;
    const T* __restrict base = patch + yr * g.sh * Wp;
    if (g.sw == 1 && g.kh == 3 && g.kw == 3) {
      const T* __restrict r0 = base;
      const T* __restrict r1 = base + g.dh * Wp;
      const T* __restrict r2 = base + 2 * g.dh * Wp;
      const int64_t d1 = g.dw, d2 = 2 * g.dw;
      typedef typename VecT<T>::V V;
      constexpr int64_t VL = kVB / sizeof(T);
      const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6],
              w7 = w[7], w8 = w[8];
      const V z = {};
      const V v0 = z + w0, v1 = z + w1, v2 = z + w2, v3 = z + w3, v4 = z + w4, v5 = z + w5,
              v6 = z + w6, v7 = z + w7, v8 = z + w8;
      int64_t x = 0;
      for (; x + VL <= Wo; x += VL) {
        const V a = v0 * vload<V>(r0 + x) + v1 * vload<V>(r0 + x + d1) + v2 * vload<V>(r0 + x + d2) +
                    v3 * vload<V>(r1 + x) + v4 * vload<V>(r1 + x + d1) + v5 * vload<V>(r1 + x + d2) +
                    v6 * vload<V>(r2 + x) + v7 * vload<V>(r2 + x + d1) + v8 * vload<V>(r2 + x + d2);
        vstore(o + x, a);
      }
      for (; x < Wo; ++x) {
        o[x] = w0 * r0[x] + w1 * r0[x + d1] + w2 * r0[x + d2] + w3 * r1[x] + w4 * r1[x + d1] +
               w5 * r1[x + d2] + w6 * r2[x] + w7 * r2[x + d1] + w8 * r2[x + d2];
      }
    } else if (g.sw == 1) {
      for (int64_t x = 0; x < Wo; ++x) o[x] = 0;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const T wv = w[i * g.kw + j];
          const T* __restrict s = base + g.dh * i * Wp + g.dw * j;
          for (int64_t x = 0; x < Wo; ++x) o[x] += wv * s[x];
        }
    } else {
      for (int64_t x = 0; x < Wo; ++x) {
        T acc = 0;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j)
            acc += w[i * g.kw + j] * base[g.dh * i * Wp + x * g.sw + g.dw * j];
        o[x] = acc;
      }
    }
  }
}

// Flat layout (stride 1): out[t] = sum_{i, j} w[i * kw + j] patch[t + dh i Wp + dw j] for every
// t < ncols; t = yr * Wp + x is output (yr, x) for x < Wo, the other columns are garbage.
template <typename T>
NSL_INLINE void dw_flat(const LGeom& g, const T* __restrict patch, const T* __restrict w,
                        T* __restrict out, int64_t ncols) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  const int64_t Wp = g.Wp, dh = g.dh, dw = g.dw;
  const V z = {};
  if (g.kh == 3 && g.kw == 3) {
    const T* __restrict r0 = patch;
    const T* __restrict r1 = patch + dh * Wp;
    const T* __restrict r2 = patch + 2 * dh * Wp;
    const int64_t d1 = dw, d2 = 2 * dw;
    const V v0 = z + w[0], v1 = z + w[1], v2 = z + w[2], v3 = z + w[3], v4 = z + w[4],
            v5 = z + w[5], v6 = z + w[6], v7 = z + w[7], v8 = z + w[8];
    for (int64_t t = 0; t < ncols; t += VL) {
      const V a = v0 * vload<V>(r0 + t) + v1 * vload<V>(r0 + t + d1) + v2 * vload<V>(r0 + t + d2) +
                  v3 * vload<V>(r1 + t) + v4 * vload<V>(r1 + t + d1) + v5 * vload<V>(r1 + t + d2) +
                  v6 * vload<V>(r2 + t) + v7 * vload<V>(r2 + t + d1) + v8 * vload<V>(r2 + t + d2);
      vstore(out + t, a);
    }
    return;
  }
  for (int64_t t = 0; t < ncols; t += VL) {
    V a = z;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        a += (z + w[i * g.kw + j]) * vload<V>(patch + t + dh * i * Wp + dw * j);
    vstore(out + t, a);
  }
}

// Zero the garbage columns of a tile buffer row: x >= Wo of each output row (flat layout) and
// [rows * pitch, ncols).
template <typename T>
NSL_INLINE void clean(const LGeom& g, T* a, int64_t rows, int64_t ncols) {
  if (g.pitch > g.Wo)
    for (int64_t yr = 0; yr < rows; ++yr)
      for (int64_t x = g.Wo; x < g.pitch; ++x) a[yr * g.pitch + x] = 0;
  zero_row(a + rows * g.pitch, ncols - rows * g.pitch);
}

// Adjoint of dw_flat (dA clean, ncols columns): gw[q] += sum_t dA[t] patch[t + off_q] (when gw),
// and the dx plane += dw^T dA (when dxc), as a gather: input (r, s) of the patch takes
// sum_q w_q dA[(r - dh i) Wp + s - dw j] from dA placed between zeros in dpad.
template <typename T>
NSL_INLINE void dw_backward_flat(const LGeom& g, const T* __restrict patch,
                                 const T* __restrict w, const T* __restrict dA, int64_t y0,
                                 int64_t rows, int64_t ncols, T* __restrict gw,
                                 T* __restrict dpad, T* __restrict dxc) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  const int64_t Wp = g.Wp, dh = g.dh, dw = g.dw;
  const bool k3 = g.kh == 3 && g.kw == 3;
  if (gw && k3) {
    const T* __restrict p0 = patch;
    const T* __restrict p1 = patch + dh * Wp;
    const T* __restrict p2 = patch + 2 * dh * Wp;
    const int64_t e1 = dw, e2 = 2 * dw;
    V c0 = {}, c1 = {}, c2 = {}, c3 = {}, c4 = {}, c5 = {}, c6 = {}, c7 = {}, c8 = {};
    for (int64_t t = 0; t < ncols; t += VL) {
      const V av = vload<V>(dA + t);
      c0 += av * vload<V>(p0 + t); c1 += av * vload<V>(p0 + t + e1); c2 += av * vload<V>(p0 + t + e2);
      c3 += av * vload<V>(p1 + t); c4 += av * vload<V>(p1 + t + e1); c5 += av * vload<V>(p1 + t + e2);
      c6 += av * vload<V>(p2 + t); c7 += av * vload<V>(p2 + t + e1); c8 += av * vload<V>(p2 + t + e2);
    }
    gw[0] += hsum<T>(c0); gw[1] += hsum<T>(c1); gw[2] += hsum<T>(c2);
    gw[3] += hsum<T>(c3); gw[4] += hsum<T>(c4); gw[5] += hsum<T>(c5);
    gw[6] += hsum<T>(c6); gw[7] += hsum<T>(c7); gw[8] += hsum<T>(c8);
  } else if (gw) {
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const T* __restrict p = patch + dh * i * Wp + dw * j;
        V a0 = {}, a1 = {};
        int64_t t = 0;
        for (; t + 2 * VL <= ncols; t += 2 * VL) {
          a0 += vload<V>(dA + t) * vload<V>(p + t);
          a1 += vload<V>(dA + t + VL) * vload<V>(p + t + VL);
        }
        for (; t < ncols; t += VL) a0 += vload<V>(dA + t) * vload<V>(p + t);
        gw[i * g.kw + j] += hsum<T>(a0 + a1);
      }
  }
  if (!dxc) return;
  const int64_t span = rows * Wp, pre = dh * (g.kh - 1) * Wp + dw * (g.kw - 1);
  zero_row(dpad, pre);
  copy_row(dpad + pre, dA, span);
  zero_row(dpad + pre + span, dh * (g.kh - 1) * Wp + 2 * VL);
  const int64_t rp = rows + dh * (g.kh - 1), r0 = y0 - g.ph, ncol = std::min(g.W, Wp - g.pw);
  const V z = {};
  for (int64_t r = 0; r < rp; ++r) {
    const int64_t ih = r0 + r;
    if (ih < 0 || ih >= g.H) continue;
    const T* __restrict b = dpad + pre + r * Wp + g.pw;  // tap (i, j) reads b[x - dh i Wp - dw j]
    T* __restrict d = dxc + ih * g.W;
    if (k3) {
      const T* __restrict q0 = b;
      const T* __restrict q1 = b - dh * Wp;
      const T* __restrict q2 = b - 2 * dh * Wp;
      const int64_t e1 = dw, e2 = 2 * dw;
      const V v0 = z + w[0], v1 = z + w[1], v2 = z + w[2], v3 = z + w[3], v4 = z + w[4],
              v5 = z + w[5], v6 = z + w[6], v7 = z + w[7], v8 = z + w[8];
      int64_t x = 0;
      for (; x + VL <= ncol; x += VL) {
        const V s = v0 * vload<V>(q0 + x) + v1 * vload<V>(q0 + x - e1) + v2 * vload<V>(q0 + x - e2) +
                    v3 * vload<V>(q1 + x) + v4 * vload<V>(q1 + x - e1) + v5 * vload<V>(q1 + x - e2) +
                    v6 * vload<V>(q2 + x) + v7 * vload<V>(q2 + x - e1) + v8 * vload<V>(q2 + x - e2);
        vstore(d + x, vload<V>(d + x) + s);
      }
      for (; x < ncol; ++x)
        d[x] += w[0] * q0[x] + w[1] * q0[x - e1] + w[2] * q0[x - e2] + w[3] * q1[x] +
                w[4] * q1[x - e1] + w[5] * q1[x - e2] + w[6] * q2[x] + w[7] * q2[x - e1] +
                w[8] * q2[x - e2];
    } else {
      for (int64_t x = 0; x < ncol; ++x) {
        T s = 0;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j) s += w[i * g.kw + j] * b[x - dh * i * Wp - dw * j];
        d[x] += s;
      }
    }
  }
}

// Adjoint of dw_rows for the rows of one channel: gw[q] += sum dA (x) shifted patch (when gw), and
// dx plane += dw^T dA (when dxc); dpatch: scratch of the patch's size.
template <typename T>
NSL_INLINE void dw_backward(const LGeom& g, const T* __restrict patch, const T* __restrict w,
                            const T* __restrict dA, int64_t y0, int64_t rows, T* __restrict gw,
                            T* __restrict dpatch, T* __restrict dxc) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  if (!gw && !dxc) return;
  const int64_t Wo = g.Wo, Wp = g.Wp, rp = (rows - 1) * g.sh + g.dh * (g.kh - 1) + 1;
  if (dxc) zero_row(dpatch, rp * Wp);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const T wv = w[i * g.kw + j];
      const int64_t off = g.dh * i * Wp + g.dw * j;
      V sv = {};
      T st = 0;
      for (int64_t yr = 0; yr < rows; ++yr) {
        const T* __restrict a = dA + yr * Wo;
        const T* __restrict p = patch + yr * g.sh * Wp + off;
        T* __restrict dp = dpatch + yr * g.sh * Wp + off;
        if (g.sw == 1) {
          int64_t x = 0;
          for (; x + VL <= Wo; x += VL) {
            const V av = vload<V>(a + x);
            if (gw) sv += av * vload<V>(p + x);
            if (dxc) vstore(dp + x, vload<V>(dp + x) + wv * av);
          }
          for (; x < Wo; ++x) {
            if (gw) st += a[x] * p[x];
            if (dxc) dp[x] += wv * a[x];
          }
        } else {
          for (int64_t x = 0; x < Wo; ++x) {
            if (gw) st += a[x] * p[x * g.sw];
            if (dxc) dp[x * g.sw] += wv * a[x];
          }
        }
      }
      if (gw) gw[i * g.kw + j] += hsum<T>(sv) + st;
    }
  if (!dxc) return;
  const int64_t r0 = y0 * g.sh - g.ph;
  const int64_t hi = std::min(g.Wp, g.pw + g.W);  // patch columns inside the image: [pw, hi)
  for (int64_t r = 0; r < rp; ++r) {
    const int64_t ih = r0 + r;
    if (ih < 0 || ih >= g.H) continue;
    T* __restrict d = dxc + ih * g.W - g.pw;
    const T* __restrict s = dpatch + r * Wp;
    for (int64_t c = g.pw; c < hi; ++c) d[c] += s[c];
  }
}

// r[t] = ReLU(s a[t] + b) (NaN stays NaN, as F.relu) for t < n.
template <typename T>
NSL_INLINE void affine_relu(const T* __restrict a, T s, T b, T* __restrict r, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const T y = s * a[t] + b;
    r[t] = y < T(0) ? T(0) : y;
  }
}

// s1 += sum d[t], s2 += sum d[t] a[t] (t < n): partial sums in T over chunks, totals in double.
template <typename T>
NSL_INLINE void sum_dot(const T* __restrict d, const T* __restrict a, int64_t n, double& s1,
                        double& s2) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T), kChunk = 32 * VL;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V v1 = {}, v2 = {};
    int64_t t = c0;
    for (; t + VL <= c1; t += VL) {
      const V dv = vload<V>(d + t);
      v1 += dv;
      v2 += dv * vload<V>(a + t);
    }
    T t1 = hsum<T>(v1), t2 = hsum<T>(v2);
    for (; t < c1; ++t) {
      t1 += d[t];
      t2 += d[t] * a[t];
    }
    s1 += t1;
    s2 += t2;
  }
}

// s1 += sum a[t], s2 += sum a[t]^2 (t < n): sum_dot of a with itself.
template <typename T>
NSL_INLINE void sum_sq(const T* a, int64_t n, double& s1, double& s2) {
  sum_dot(a, a, n, s1, s2);
}

// C[m * ldc + t] = (bias[m]) + sum_k A[m * lda + k] B[k * ldb + t] for m < M, t < ncols
// (ncols a multiple of 2 vectors): 4 x 2-vector register blocks.
template <typename T>
NSL_INLINE void gemm_nn(int64_t M, int64_t K, const T* __restrict A, int64_t lda,
                        const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                        int64_t ncols, const T* __restrict bias) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const T* a0 = A + m * lda;
    const T* a1 = a0 + lda;
    const T* a2 = a1 + lda;
    const T* a3 = a2 + lda;
    const V z = {};
    const V i0 = bias ? z + bias[m] : z, i1 = bias ? z + bias[m + 1] : z;
    const V i2 = bias ? z + bias[m + 2] : z, i3 = bias ? z + bias[m + 3] : z;
    for (int64_t t = 0; t < ncols; t += 2 * VL) {
      V c00 = i0, c01 = i0, c10 = i1, c11 = i1, c20 = i2, c21 = i2, c30 = i3, c31 = i3;
      const T* b = B + t;
      for (int64_t k = 0; k < K; ++k, b += ldb) {
        const V b0 = vload<V>(b), b1 = vload<V>(b + VL);
        const T x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        c00 += x0 * b0; c01 += x0 * b1;
        c10 += x1 * b0; c11 += x1 * b1;
        c20 += x2 * b0; c21 += x2 * b1;
        c30 += x3 * b0; c31 += x3 * b1;
      }
      T* c = C + m * ldc + t;
      vstore(c, c00); vstore(c + VL, c01);
      vstore(c + ldc, c10); vstore(c + ldc + VL, c11);
      vstore(c + 2 * ldc, c20); vstore(c + 2 * ldc + VL, c21);
      vstore(c + 3 * ldc, c30); vstore(c + 3 * ldc + VL, c31);
    }
  }
  for (; m < M; ++m) {
    const T* a0 = A + m * lda;
    const V z = {};
    const V i0 = bias ? z + bias[m] : z;
    for (int64_t t = 0; t < ncols; t += 2 * VL) {
      V c00 = i0, c01 = i0;
      const T* b = B + t;
      for (int64_t k = 0; k < K; ++k, b += ldb) {
        c00 += a0[k] * vload<V>(b);
        c01 += a0[k] * vload<V>(b + VL);
      }
      vstore(C + m * ldc + t, c00);
      vstore(C + m * ldc + t + VL, c01);
    }
  }
}

// G[m * ldg + k] += sum_{t < n} D[m * ldd + t] R[k * ldr + t] for m < M, k < K (a weight gradient;
// n a multiple of the vector length): 4 x 2 blocks of vector accumulators (plain variables: arrays
// of vectors would go through memory), reduced at the end.
template <typename T>
NSL_INLINE void gemm_nt_acc(int64_t M, int64_t K, const T* D, int64_t ldd, const T* R,
                            int64_t ldr, int64_t n, T* G, int64_t ldg) {
  typedef typename VecT<T>::V V;
  constexpr int64_t VL = kVB / sizeof(T);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const T* d0 = D + m * ldd;
    const T* d1 = d0 + ldd;
    const T* d2 = d1 + ldd;
    const T* d3 = d2 + ldd;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const T* r0 = R + k * ldr;
      const T* r1 = r0 + ldr;
      V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      for (int64_t t = 0; t < n; t += VL) {
        const V x0 = vload<V>(r0 + t), x1 = vload<V>(r1 + t);
        V e = vload<V>(d0 + t);
        a00 += e * x0; a01 += e * x1;
        e = vload<V>(d1 + t);
        a10 += e * x0; a11 += e * x1;
        e = vload<V>(d2 + t);
        a20 += e * x0; a21 += e * x1;
        e = vload<V>(d3 + t);
        a30 += e * x0; a31 += e * x1;
      }
      T* gm = G + m * ldg + k;
      gm[0] += hsum<T>(a00); gm[1] += hsum<T>(a01);
      gm[ldg] += hsum<T>(a10); gm[ldg + 1] += hsum<T>(a11);
      gm[2 * ldg] += hsum<T>(a20); gm[2 * ldg + 1] += hsum<T>(a21);
      gm[3 * ldg] += hsum<T>(a30); gm[3 * ldg + 1] += hsum<T>(a31);
    }
    for (; k < K; ++k) {
      const T* r0 = R + k * ldr;
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t t = 0; t < n; t += VL) {
        const V x0 = vload<V>(r0 + t);
        a0 += vload<V>(d0 + t) * x0; a1 += vload<V>(d1 + t) * x0;
        a2 += vload<V>(d2 + t) * x0; a3 += vload<V>(d3 + t) * x0;
      }
      T* gm = G + m * ldg + k;
      gm[0] += hsum<T>(a0); gm[ldg] += hsum<T>(a1);
      gm[2 * ldg] += hsum<T>(a2); gm[3 * ldg] += hsum<T>(a3);
    }
  }
  for (; m < M; ++m) {
    const T* d0 = D + m * ldd;
    for (int64_t k = 0; k < K; ++k) {
      const T* r0 = R + k * ldr;
      V a0 = {}, a1 = {};
      int64_t t = 0;
      for (; t + 2 * VL <= n; t += 2 * VL) {
        a0 += vload<V>(d0 + t) * vload<V>(r0 + t);
        a1 += vload<V>(d0 + t + VL) * vload<V>(r0 + t + VL);
      }
      for (; t < n; t += VL) a0 += vload<V>(d0 + t) * vload<V>(r0 + t);
      G[m * ldg + k] += hsum<T>(a0 + a1);
    }
  }
}

// z[t] = tanh(z[t]) for t < n. float: vectorised (Cephes-style: an odd polynomial for |z| < 0.625,
// else 1 - 2 / (exp(2 |z|) + 1) with a polynomial exp; within 2 ulp), NaN kept. double: std::tanh.
NSL_INLINE void tanh_rows(float* z, int64_t n) {
  typedef VecT<float>::V V;
  typedef VecT<float>::I I;
  constexpr int64_t VL = kVB / sizeof(float);
  int64_t t = 0;
  for (; t + VL <= n; t += VL) {
    const V x = vload<V>(z + t);
    const I bits = (I)x;
    const I sign = bits & int32_t(0x80000000u);
    V a = (V)(bits & int32_t(0x7fffffff));
    const I small = a < 0.625f;
    // small |x|: x + x^3 P(x^2)
    const V x2 = x * x;
    V p = -5.70498872745e-3f * x2 + 2.06390887954e-2f;
    p = p * x2 - 5.37397155531e-2f;
    p = p * x2 + 1.33314422036e-1f;
    p = p * x2 - 3.33332819422e-1f;
    const V ps = p * x2 * x + x;
    // large |x|: e = exp(2 |x|), 2 |x| clamped to 40 (tanh(20) is 1 in float)
    V y = a + a;
    y = y > 40.0f ? (V){} + 40.0f : y;
    const V fx = y * 1.44269504088896341f + 0.5f;
    const I ni = __builtin_convertvector(fx, I);  // trunc = floor (fx > 0)
    const V nf = __builtin_convertvector(ni, V);
    V r = y - nf * 0.693359375f + nf * 2.12194440e-4f;
    const V r2 = r * r;
    V e = 1.9875691500e-4f * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r2 + r + 1.0f;
    e = e * (V)((ni + 127) << 23);
    const V big = 1.0f - 2.0f / (e + 1.0f);
    const I bigs = (I)big | sign;
    I res = (small & (I)ps) | (~small & bigs);
    const I nan = x != x;
    res = (nan & bits) | (~nan & res);
    vstore(z + t, (V)res);
  }
  for (; t < n; ++t) z[t] = std::tanh(z[t]);
}

NSL_INLINE void tanh_rows(double* z, int64_t n) {
  for (int64_t t = 0; t < n; ++t) z[t] = std::tanh(z[t]);
}

// ------------------------------------------------------------------------------------------
// The passes over tiles
// ------------------------------------------------------------------------------------------
enum Pass { kStats0, kStats1, kOut, kBwdOne, kBwd1, kBwd2, kBwd3 };

template <typename T>
struct Ctx {
  const LGeom* g;
  const T *x, *wdw, *wpw, *wpwT, *wout, *woutT, *bout;  // bout may be null
  const T *S0, *T0, *S1, *T1;                            // [N, C], [N, hid]
  const T *U0, *V0, *U1, *V1;                            // backward (batch/group)
  T* sim_out;                                            // forward: [N, outc, L]
  const T *sim, *dsim;                                   // backward
  bool params;                                           // backward: weight gradients wanted
  bool sums;                                             // kBwdOne: norm sums (running: dgamma)
};

// One thread's accumulators (rows of the per-thread tensors).
template <typename T>
struct Acc {
  double *a0, *b0;  // [N * C]
  double *a1, *b1;  // [N * hid]
  T *gdw, *gpw, *gout, *gb;
};

// One thread's tile buffers, carved from a thread-local arena kept between calls (no page faults of
// fresh allocations on every pass): the patches of all channels, a scratch, and [rows, ld] buffers.
// Column t = yr * pitch + x of a buffer is output (y0 + yr, x) for x < Wo; the other columns (the
// flat layout's x >= Wo, and [rows * pitch, ncols)) are garbage: every operation is column-local,
// A0 is cleaned (zeroed there) as soon as it is computed so that garbage stays finite, and every
// reduction over columns has a clean operand.
template <typename T>
struct Work {
  T *patch, *dpatch, *A0, *R0, *D0, *A1, *R1, *D1, *Z;
  explicit Work(const LGeom& g) {
    static thread_local std::vector<T> arena;
    const int64_t scratch = std::max(g.Rp * g.Wp, g.ld + 2 * g.dh * (g.kh - 1) * g.Wp +
                                                      g.dw * (g.kw - 1) + 16);
    const int64_t sizes[9] = {g.C * g.psize, round_up(scratch, 16),
                              g.C * g.ld, g.C * g.ld, g.C * g.ld, g.hid * g.ld, g.hid * g.ld,
                              g.hid * g.ld, g.outc * g.ld};
    int64_t total = 0;
    for (int64_t k : sizes) total += k;
    if (int64_t(arena.size()) < total) arena.assign(total, T(0));
    T* p = arena.data();
    T** slots[9] = {&patch, &dpatch, &A0, &R0, &D0, &A1, &R1, &D1, &Z};
    for (int k = 0; k < 9; ++k) {
      *slots[k] = p;
      p += sizes[k];
    }
  }
};

// The depthwise backward of channel ch for a tile (a function, not a lambda: a lambda would not be
// compiled for the multiversioned caller's instruction set).
template <typename T>
NSL_INLINE void dw_back(const LGeom& g, const Work<T>& w, const T* wdw, T* gdw, T* dxn, int64_t ch,
                        const T* d0, int64_t y0, int64_t rows, int64_t ncols) {
  T* gw = gdw ? gdw + ch * g.P : nullptr;
  T* dxc = dxn ? dxn + ch * g.H * g.W : nullptr;
  if (g.flat) {
    dw_backward_flat(g, w.patch + ch * g.psize, wdw + ch * g.P, d0, y0, rows, ncols, gw, w.dpatch,
                     dxc);
  } else {
    dw_backward(g, w.patch + ch * g.psize, wdw + ch * g.P, d0, y0, rows, gw, w.dpatch, dxc);
  }
}

template <typename T, int PASS>
NSL_INLINE void tile_pass_body(const Ctx<T>& c, const Acc<T>& acc, Work<T>& w, int64_t n, int64_t tile,
                               T* dxn) {
  constexpr int64_t VL = kVB / sizeof(T);
  const LGeom& g = *c.g;
  const int64_t C = g.C, hid = g.hid, P = g.P, HW = g.H * g.W, ld = g.ld, L = g.L;
  const int64_t y0 = tile * g.rows, rows = std::min(g.rows, g.Ho - y0), pitch = g.pitch;
  const int64_t ncols = round_up(rows * pitch, 2 * VL);
  const T* xn = c.x + n * C * HW;
  const bool dw_grad = PASS == kBwdOne || PASS == kBwd2 || PASS == kBwd3;
  T* gdw = dw_grad && c.params ? acc.gdw : nullptr;
  // depthwise conv (and, pass 3 of the backward, the rest of dA0 through its adjoint)
  for (int64_t ch = 0; ch < C; ++ch) {
    T* pc = w.patch + ch * g.psize;
    build_patch(g, xn + ch * HW, y0, rows, pc);
    T* a0 = w.A0 + ch * ld;
    if (g.flat) {
      dw_flat(g, pc, c.wdw + ch * P, a0, ncols);
    } else {
      dw_rows(g, pc, c.wdw + ch * P, rows, a0);
    }
    clean(g, a0, rows, ncols);
    if (PASS == kStats0) sum_sq(a0, ncols, acc.a0[n * C + ch], acc.b0[n * C + ch]);
    if (PASS == kBwd3) {
      const T u = c.U0[n * C + ch], v = c.V0[n * C + ch];
      T* d0 = w.D0 + ch * ld;
      for (int64_t t = 0; t < ncols; ++t) d0[t] = u * a0[t] + v;
      clean(g, d0, rows, ncols);
      dw_back(g, w, c.wdw, gdw, dxn, ch, d0, y0, rows, ncols);
    }
  }
  if (PASS == kStats0 || PASS == kBwd3) return;
  for (int64_t ch = 0; ch < C; ++ch)
    affine_relu(w.A0 + ch * ld, c.S0[n * C + ch], c.T0[n * C + ch], w.R0 + ch * ld, ncols);
  gemm_nn(hid, C, c.wpw, C, w.R0, ld, w.A1, ld, ncols, static_cast<const T*>(nullptr));
  if (PASS == kStats1) {
    for (int64_t o = 0; o < hid; ++o) {
      clean(g, w.A1 + o * ld, rows, ncols);
      sum_sq(w.A1 + o * ld, ncols, acc.a1[n * hid + o], acc.b1[n * hid + o]);
    }
    return;
  }
  for (int64_t o = 0; o < hid; ++o)
    affine_relu(w.A1 + o * ld, c.S1[n * hid + o], c.T1[n * hid + o], w.R1 + o * ld, ncols);
  const int64_t outc = g.outc, Wo = g.Wo;
  if (PASS == kOut) {
    gemm_nn(outc, hid, c.wout, hid, w.R1, ld, w.Z, ld, ncols, c.bout);
    for (int64_t p = 0; p < outc; ++p) {
      T* z = w.Z + p * ld;
      tanh_rows(z, ncols);
      const T id = g.idstep && p % g.idstep == 0 ? T(1) : T(0);
      T* __restrict s = c.sim_out + (n * outc + p) * L + y0 * Wo;
      if (pitch == Wo && id == T(0)) {
        copy_row(s, z, rows * Wo);
      } else {
        for (int64_t yr = 0; yr < rows; ++yr)
          for (int64_t x = 0; x < Wo; ++x) s[yr * Wo + x] = z[yr * pitch + x] + id;
      }
    }
    return;
  }
  // ---- backward: dZ = dsim (1 - g^2), g = sim - identity (clean)
  for (int64_t p = 0; p < outc; ++p) {
    T* __restrict z = w.Z + p * ld;
    const T id = g.idstep && p % g.idstep == 0 ? T(1) : T(0);
    const T* __restrict s = c.sim + (n * outc + p) * L + y0 * Wo;
    const T* __restrict ds = c.dsim + (n * outc + p) * L + y0 * Wo;
    for (int64_t yr = 0; yr < rows; ++yr)
      for (int64_t x = 0; x < Wo; ++x) {
        const T gv = s[yr * Wo + x] - id;
        z[yr * pitch + x] = ds[yr * Wo + x] * (T(1) - gv * gv);
      }
    clean(g, z, rows, ncols);
  }
  if ((PASS == kBwdOne || PASS == kBwd1) && c.params) {
    gemm_nt_acc(outc, hid, w.Z, ld, w.R1, ld, ncols, acc.gout, hid);
    for (int64_t p = 0; p < outc; ++p) {
      double s1 = 0, s2 = 0;
      sum_sq(w.Z + p * ld, ncols, s1, s2);
      acc.gb[p] += T(s1);
    }
  }
  // dY1 = [Y1 > 0] Wout^T dZ (clean)
  gemm_nn(hid, outc, c.woutT, outc, w.Z, ld, w.D1, ld, ncols, static_cast<const T*>(nullptr));
  for (int64_t o = 0; o < hid; ++o) {
    T* __restrict d = w.D1 + o * ld;
    const T* __restrict r = w.R1 + o * ld;
    for (int64_t t = 0; t < ncols; ++t) d[t] = r[t] > T(0) ? d[t] : T(0);
  }
  if (PASS == kBwd1 || (PASS == kBwdOne && c.sums)) {
    for (int64_t o = 0; o < hid; ++o)
      sum_dot(w.D1 + o * ld, w.A1 + o * ld, ncols, acc.a1[n * hid + o], acc.b1[n * hid + o]);
  }
  if (PASS == kBwd1) return;
  // dA1 = S1 dY1 (+ U1 A1 + V1, then cleaned)
  for (int64_t o = 0; o < hid; ++o) {
    T* __restrict d = w.D1 + o * ld;
    const T s = c.S1[n * hid + o];
    if (PASS == kBwd2) {
      const T* __restrict a = w.A1 + o * ld;
      const T u = c.U1[n * hid + o], v = c.V1[n * hid + o];
      for (int64_t t = 0; t < ncols; ++t) d[t] = s * d[t] + u * a[t] + v;
      clean(g, d, rows, ncols);
    } else {
      for (int64_t t = 0; t < ncols; ++t) d[t] *= s;
    }
  }
  if (c.params) gemm_nt_acc(hid, C, w.D1, ld, w.R0, ld, ncols, acc.gpw, C);
  // dY0 = [Y0 > 0] Wpw^T dA1; dA0 = S0 dY0 (clean; + U0 A0 + V0 in pass 3)
  gemm_nn(C, hid, c.wpwT, hid, w.D1, ld, w.D0, ld, ncols, static_cast<const T*>(nullptr));
  const bool sums0 = PASS == kBwd2 || (PASS == kBwdOne && c.sums);
  for (int64_t ch = 0; ch < C; ++ch) {
    T* __restrict d = w.D0 + ch * ld;
    const T* __restrict r = w.R0 + ch * ld;
    for (int64_t t = 0; t < ncols; ++t) d[t] = r[t] > T(0) ? d[t] : T(0);
    if (sums0) sum_dot(d, w.A0 + ch * ld, ncols, acc.a0[n * C + ch], acc.b0[n * C + ch]);
    const T s = c.S0[n * C + ch];
    for (int64_t t = 0; t < ncols; ++t) d[t] *= s;
    dw_back(g, w, c.wdw, gdw, dxn, ch, d, y0, rows, ncols);
  }
}

template <int PASS>
NSL_MULTIVERSION void tile_pass(const Ctx<float>& c, const Acc<float>& acc, Work<float>& w, int64_t n,
                                int64_t tile, float* dxn) {
  tile_pass_body<float, PASS>(c, acc, w, n, tile, dxn);
}

template <int PASS>
void tile_pass(const Ctx<double>& c, const Acc<double>& acc, Work<double>& w, int64_t n, int64_t tile,
               double* dxn) {
  tile_pass_body<double, PASS>(c, acc, w, n, tile, dxn);
}

// Runs pass PASS over every tile. Accumulators: one row per thread of each tensor in `accs`
// (zeroed here). dx (when not null, [N, C, H, W], zeroed by the caller): each image's dx is
// written by one thread, or, with fewer images than threads, through per-thread buffers.
template <typename T, int PASS>
void run_pass(const Ctx<T>& c, std::vector<at::Tensor>& accs, T* dx) {
  const LGeom& g = *c.g;
  for (auto& a : accs) a.zero_();
  auto acc_of = [&](int64_t tid) {
    Acc<T> a;
    a.a0 = accs[0][tid].data_ptr<double>();
    a.b0 = accs[1][tid].data_ptr<double>();
    a.a1 = accs[2][tid].data_ptr<double>();
    a.b1 = accs[3][tid].data_ptr<double>();
    a.gdw = accs[4][tid].data_ptr<T>();
    a.gpw = accs[5][tid].data_ptr<T>();
    a.gout = accs[6][tid].data_ptr<T>();
    a.gb = accs[7][tid].data_ptr<T>();
    return a;
  };
  const int64_t threads = accs[0].size(0), img = g.C * g.H * g.W;
  if (dx == nullptr) {
    at::parallel_for(0, g.N * g.ntiles, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(g);
      const Acc<T> a = acc_of(at::get_thread_num());
      for (int64_t it = begin; it < end; ++it)
        tile_pass<PASS>(c, a, w, it / g.ntiles, it % g.ntiles, nullptr);
    });
  } else if (g.N >= threads) {
    at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(g);
      const Acc<T> a = acc_of(at::get_thread_num());
      for (int64_t n = begin; n < end; ++n)
        for (int64_t tile = 0; tile < g.ntiles; ++tile)
          tile_pass<PASS>(c, a, w, n, tile, dx + n * img);
    });
  } else {
    at::Tensor buf = at::empty({threads, img}, accs[4].options());
    for (int64_t n = 0; n < g.N; ++n) {
      buf.zero_();
      at::parallel_for(0, g.ntiles, 1, [&](int64_t begin, int64_t end) {
        Work<T> w(g);
        const int64_t tid = at::get_thread_num();
        const Acc<T> a = acc_of(tid);
        T* dxt = buf[tid].data_ptr<T>();
        for (int64_t tile = begin; tile < end; ++tile) tile_pass<PASS>(c, a, w, n, tile, dxt);
      });
      at::Tensor dxn = at::from_blob(dx + n * img, {img}, buf.options());
      dxn.add_(buf.sum(0));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Norms: statistics, the per-(n, c) affine maps and the backward's coefficients
// ------------------------------------------------------------------------------------------
struct NormArgs {
  int64_t mode, groups;
  double eps;
  at::Tensor gamma, beta, mean, var;  // compute dtype, contiguous; undefined where absent
};

// The statistics set of (n, c) among `cn` channels and its element count, for batch/group.
struct Sets {
  int64_t mode, N, cn, groups, L;
  int64_t count() const { return mode == kBatch ? N * L : cn / groups * L; }
  int64_t size() const { return mode == kBatch ? cn : N * groups; }
  int64_t of(int64_t n, int64_t c) const {
    return mode == kBatch ? c : n * groups + c / (cn / groups);
  }
};

// Batch/group statistics from per-(n, c) sums of A and A^2: mean and biased variance per set,
// rounded to T (what is returned, and what every pass uses, forward and backward alike).
template <typename T>
void stats_from_sums(const Sets& s, const std::vector<double>& s1, const std::vector<double>& s2,
                     T* mean, T* var) {
  std::vector<double> m(s.size(), 0.0), q(s.size(), 0.0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.cn; ++c) {
      m[s.of(n, c)] += s1[n * s.cn + c];
      q[s.of(n, c)] += s2[n * s.cn + c];
    }
  const double cnt = double(s.count());
  for (int64_t k = 0; k < s.size(); ++k) {
    const double mu = m[k] / cnt;
    mean[k] = T(mu);
    var[k] = T(std::max(0.0, q[k] / cnt - mu * mu));
  }
}

// Per (n, c): the set's mean and 1 / sqrt(var + eps) (mode running/batch/group), as doubles.
template <typename T>
void set_moments(const NormArgs& na, int64_t N, int64_t cn, int64_t L, std::vector<double>& mu,
                 std::vector<double>& rs) {
  mu.assign(N * cn, 0.0);
  rs.assign(N * cn, 1.0);
  if (na.mode == kNone) return;
  const T* m = na.mean.data_ptr<T>();
  const T* v = na.var.data_ptr<T>();
  const Sets s{na.mode, N, cn, na.groups, L};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t k = na.mode == kRunning ? c : s.of(n, c);
      mu[n * cn + c] = double(m[k]);
      rs[n * cn + c] = 1.0 / std::sqrt(double(v[k]) + na.eps);
    }
}

// S = gamma rstd, T = beta - mean S per (n, c) (S = 1, T = 0 without a norm).
template <typename T>
void affine_of(const NormArgs& na, int64_t N, int64_t cn, const std::vector<double>& mu,
               const std::vector<double>& rs, std::vector<T>& S, std::vector<T>& Tt) {
  S.assign(N * cn, T(1));
  Tt.assign(N * cn, T(0));
  if (na.mode == kNone) return;
  const T* gm = na.gamma.defined() ? na.gamma.data_ptr<T>() : nullptr;
  const T* bt = na.beta.defined() ? na.beta.data_ptr<T>() : nullptr;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < cn; ++c) {
      const double s = (gm ? double(gm[c]) : 1.0) * rs[n * cn + c];
      S[n * cn + c] = T(s);
      Tt[n * cn + c] = T((bt ? double(bt[c]) : 0.0) - mu[n * cn + c] * s);
    }
}

// From the sums SD = sum dY, SDA = sum dY A per (n, c): dgamma, dbeta (when wanted) and, for
// batch/group, dA = S dY + U A + V: U = -r^2 E2, V = -r E1 + r^2 E2 mu with
// E1 = mean over the set of gamma dY, E2 = mean of gamma dY xhat.
template <typename T>
void norm_backward(const NormArgs& na, int64_t N, int64_t cn, int64_t L,
                   const std::vector<double>& mu, const std::vector<double>& rs,
                   const std::vector<double>& SD, const std::vector<double>& SDA, std::vector<T>& U,
                   std::vector<T>& V, at::Tensor& dgamma, at::Tensor& dbeta) {
  const T* gm = na.gamma.defined() ? na.gamma.data_ptr<T>() : nullptr;
  if (dgamma.defined() || dbeta.defined()) {
    std::vector<double> dg(cn, 0.0), db(cn, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t k = n * cn + c;
        dg[c] += rs[k] * (SDA[k] - mu[k] * SD[k]);
        db[c] += SD[k];
      }
    if (dgamma.defined())
      for (int64_t c = 0; c < cn; ++c) dgamma.data_ptr<T>()[c] = T(dg[c]);
    if (dbeta.defined())
      for (int64_t c = 0; c < cn; ++c) dbeta.data_ptr<T>()[c] = T(db[c]);
  }
  U.assign(N * cn, T(0));
  V.assign(N * cn, T(0));
  if (na.mode != kBatch && na.mode != kGroup) return;
  const Sets s{na.mode, N, cn, na.groups, L};
  std::vector<double> e1(s.size(), 0.0), e2(s.size(), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t k = n * cn + c, j = s.of(n, c);
      const double gc = gm ? double(gm[c]) : 1.0;
      e1[j] += gc * SD[k];
      e2[j] += gc * rs[k] * (SDA[k] - mu[k] * SD[k]);
    }
  const double cnt = double(s.count());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t k = n * cn + c, j = s.of(n, c);
      const double r = rs[k], E1 = e1[j] / cnt, E2 = e2[j] / cnt;
      U[k] = T(-r * r * E2);
      V[k] = T(-r * E1 + r * r * E2 * mu[k]);
    }
}

// ------------------------------------------------------------------------------------------
// The operators' CPU kernels
// ------------------------------------------------------------------------------------------
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

at::Tensor opt_compute(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  return t.has_value() && t->defined() ? as_compute(*t, ct) : at::Tensor();
}

NormArgs norm_args(int64_t mode, int64_t groups, double eps, const std::optional<at::Tensor>& gamma,
                   const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& var, int64_t channels, at::ScalarType ct,
                   const char* which) {
  TORCH_CHECK(mode >= kNone && mode <= kGroup, "light_predictor: unknown norm code ", mode);
  NormArgs na{mode, groups, eps, opt_compute(gamma, ct), opt_compute(beta, ct),
              opt_compute(mean, ct), opt_compute(var, ct)};
  for (const at::Tensor* t : {&na.gamma, &na.beta})
    TORCH_CHECK(!t->defined() || t->numel() == channels, "light_predictor: norm ", which,
                " weight/bias must have ", channels, " entries");
  if (mode == kGroup)
    TORCH_CHECK(groups >= 1 && channels % groups == 0, "light_predictor: norm ", which,
                " groups must divide ", channels);
  return na;
}

// Statistics and backward-coefficient sums, one row per thread: a0, b0 [N * C], a1, b1 [N * hid]
// (double), then dWdw [C * P], dWpw [hid * C], dWout [outc * hid], db [outc] (compute dtype).
std::vector<at::Tensor> thread_accumulators(const LGeom& g, at::ScalarType ct) {
  const int64_t th = at::get_num_threads();
  const auto d = at::TensorOptions().dtype(at::kDouble);
  const auto o = at::TensorOptions().dtype(ct);
  return {at::zeros({th, g.N * g.C}, d),     at::zeros({th, g.N * g.C}, d),
          at::zeros({th, g.N * g.hid}, d),   at::zeros({th, g.N * g.hid}, d),
          at::zeros({th, g.C * g.P}, o),     at::zeros({th, g.hid * g.C}, o),
          at::zeros({th, g.outc * g.hid}, o), at::zeros({th, g.outc}, o)};
}

std::vector<double> summed(const at::Tensor& acc) {
  const at::Tensor s = acc.sum(0).contiguous();
  return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

template <typename T>
Ctx<T> make_ctx(const LGeom& g, const at::Tensor& x, const at::Tensor& wdw, const at::Tensor& wpw,
                const at::Tensor& wpwT, const at::Tensor& wout, const at::Tensor& woutT) {
  Ctx<T> c{};
  c.g = &g;
  c.x = x.data_ptr<T>();
  c.wdw = wdw.data_ptr<T>();
  c.wpw = wpw.data_ptr<T>();
  c.wpwT = wpwT.data_ptr<T>();
  c.wout = wout.data_ptr<T>();
  c.woutT = woutT.data_ptr<T>();
  return c;
}

using Opt = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x_in, const at::Tensor& dw_in, const at::Tensor& pw_in,
    const at::Tensor& out_in, const Opt& bias_in, const Opt& weight0, const Opt& bias0,
    const Opt& mean0, const Opt& var0, const Opt& weight1, const Opt& bias1, const Opt& mean1,
    const Opt& var1, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t norm, int64_t groups0, int64_t groups1, double eps0, double eps1, bool identity) {
  const at::ScalarType ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct), wdw = as_compute(dw_in, ct),
                   wpw = as_compute(pw_in, ct), wout = as_compute(out_in, ct);
  const at::Tensor bout = opt_compute(bias_in, ct);
  const LGeom g = make_lgeom(x, wdw, wpw, wout, stride, padding, dilation, identity);
  TORCH_CHECK(!bout.defined() || bout.numel() == g.outc, "light_predictor: out_bias must have ",
              g.outc, " entries");
  NormArgs n0 = norm_args(norm, groups0, eps0, weight0, bias0, mean0, var0, g.C, ct, "0");
  NormArgs n1 = norm_args(norm, groups1, eps1, weight1, bias1, mean1, var1, g.hid, ct, "1");
  if (norm == kRunning)
    TORCH_CHECK(n0.mean.numel() == g.C && n0.var.numel() == g.C && n1.mean.numel() == g.hid &&
                    n1.var.numel() == g.hid,
                "light_predictor: running statistics of C and hidden entries expected");
  const auto opts = x.options();
  at::Tensor sim = at::empty({g.N, g.outc, g.Ho, g.Wo}, opts);
  auto stats_shape = [&](const NormArgs& na, int64_t cn) -> std::vector<int64_t> {
    if (na.mode == kBatch) return {cn};
    if (na.mode == kGroup) return {g.N, na.groups};
    return {0};
  };
  at::Tensor m0 = at::empty(stats_shape(n0, g.C), opts), v0 = at::empty(stats_shape(n0, g.C), opts);
  at::Tensor m1 = at::empty(stats_shape(n1, g.hid), opts),
             v1 = at::empty(stats_shape(n1, g.hid), opts);
  if (g.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "light_predictor_forward", [&] {
      using T = scalar_t;
      const at::Tensor wpwT = wpw.view({g.hid, g.C}).t().contiguous();
      const at::Tensor woutT = wout.view({g.outc, g.hid}).t().contiguous();
      Ctx<T> c = make_ctx<T>(g, x, wdw, wpw, wpwT, wout, woutT);
      c.bout = bout.defined() ? bout.data_ptr<T>() : nullptr;
      std::vector<T> S0, T0, S1, T1;
      std::vector<double> mu, rs;
      std::vector<at::Tensor> accs = thread_accumulators(g, ct);
      const bool stats = norm == kBatch || norm == kGroup;
      if (stats) {  // n0.mean / n0.var: the batch statistics, returned and used
        n0.mean = m0;
        n0.var = v0;
        n1.mean = m1;
        n1.var = v1;
      }
      if (stats) {
        run_pass<T, kStats0>(c, accs, nullptr);
        stats_from_sums<T>(Sets{norm, g.N, g.C, groups0, g.L}, summed(accs[0]), summed(accs[1]),
                           m0.data_ptr<T>(), v0.data_ptr<T>());
      }
      set_moments<T>(n0, g.N, g.C, g.L, mu, rs);
      affine_of<T>(n0, g.N, g.C, mu, rs, S0, T0);
      c.S0 = S0.data();
      c.T0 = T0.data();
      if (stats) {
        run_pass<T, kStats1>(c, accs, nullptr);
        stats_from_sums<T>(Sets{norm, g.N, g.hid, groups1, g.L}, summed(accs[2]), summed(accs[3]),
                           m1.data_ptr<T>(), v1.data_ptr<T>());
      }
      set_moments<T>(n1, g.N, g.hid, g.L, mu, rs);
      affine_of<T>(n1, g.N, g.hid, mu, rs, S1, T1);
      c.S1 = S1.data();
      c.T1 = T1.data();
      c.sim_out = sim.data_ptr<T>();
      run_pass<T, kOut>(c, accs, nullptr);
    });
  }
  return {sim.to(x_in.scalar_type()), m0, v0, m1, v1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& dsim_in, const at::Tensor& sim_in, const at::Tensor& x_in,
             const at::Tensor& dw_in, const at::Tensor& pw_in, const at::Tensor& out_in,
             const Opt& weight0, const Opt& bias0, const Opt& mean0, const Opt& var0,
             const Opt& weight1, const Opt& bias1, const Opt& mean1, const Opt& var1,
             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
             int64_t norm, int64_t groups0, int64_t groups1, double eps0, double eps1,
             bool identity, bool need_x, bool need_params) {
  const at::ScalarType ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct), wdw = as_compute(dw_in, ct),
                   wpw = as_compute(pw_in, ct), wout = as_compute(out_in, ct);
  const at::Tensor sim = as_compute(sim_in, ct), dsim = as_compute(dsim_in, ct);
  const LGeom g = make_lgeom(x, wdw, wpw, wout, stride, padding, dilation, identity);
  TORCH_CHECK(sim.dim() == 4 && sim.size(0) == g.N && sim.size(1) == g.outc && sim.size(2) == g.Ho &&
                  sim.size(3) == g.Wo && dsim.sizes() == sim.sizes(),
              "light_predictor_backward: sim and grad_sim must be [N, outc, Ho, Wo]");
  NormArgs n0 = norm_args(norm, groups0, eps0, weight0, bias0, mean0, var0, g.C, ct, "0");
  NormArgs n1 = norm_args(norm, groups1, eps1, weight1, bias1, mean1, var1, g.hid, ct, "1");
  if (norm != kNone) {
    auto expect = [&](const NormArgs& na, int64_t cn) {
      return na.mode == kGroup ? g.N * na.groups : cn;
    };
    TORCH_CHECK(n0.mean.defined() && n0.var.defined() && n0.mean.numel() == expect(n0, g.C) &&
                    n0.var.numel() == expect(n0, g.C) && n1.mean.defined() && n1.var.defined() &&
                    n1.mean.numel() == expect(n1, g.hid) && n1.var.numel() == expect(n1, g.hid),
                "light_predictor_backward: the norms' statistics do not match the shapes");
  }
  const auto opts = x.options();
  at::Tensor dx = need_x ? at::zeros_like(x) : at::Tensor();
  at::Tensor gdw, gpw, gout, gb, gg0, gb0, gg1, gb1;
  if (need_params) {
    gdw = at::zeros_like(wdw);
    gpw = at::zeros_like(wpw);
    gout = at::zeros_like(wout);
    gb = at::zeros({g.outc}, opts);
    if (n0.gamma.defined()) gg0 = at::zeros({g.C}, opts);
    if (n0.beta.defined()) gb0 = at::zeros({g.C}, opts);
    if (n1.gamma.defined()) gg1 = at::zeros({g.hid}, opts);
    if (n1.beta.defined()) gb1 = at::zeros({g.hid}, opts);
  }
  if (g.N > 0 && (need_x || need_params)) {
    AT_DISPATCH_FLOATING_TYPES(ct, "light_predictor_backward", [&] {
      using T = scalar_t;
      const at::Tensor wpwT = wpw.view({g.hid, g.C}).t().contiguous();
      const at::Tensor woutT = wout.view({g.outc, g.hid}).t().contiguous();
      Ctx<T> c = make_ctx<T>(g, x, wdw, wpw, wpwT, wout, woutT);
      c.sim = sim.data_ptr<T>();
      c.dsim = dsim.data_ptr<T>();
      c.params = need_params;
      std::vector<double> mu0, rs0, mu1, rs1;
      std::vector<T> S0, T0, S1, T1, U0, V0, U1, V1;
      set_moments<T>(n0, g.N, g.C, g.L, mu0, rs0);
      affine_of<T>(n0, g.N, g.C, mu0, rs0, S0, T0);
      set_moments<T>(n1, g.N, g.hid, g.L, mu1, rs1);
      affine_of<T>(n1, g.N, g.hid, mu1, rs1, S1, T1);
      c.S0 = S0.data(); c.T0 = T0.data(); c.S1 = S1.data(); c.T1 = T1.data();
      std::vector<at::Tensor> accs = thread_accumulators(g, ct);
      T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
      if (norm == kBatch || norm == kGroup) {
        run_pass<T, kBwd1>(c, accs, nullptr);
        norm_backward<T>(n1, g.N, g.hid, g.L, mu1, rs1, summed(accs[2]), summed(accs[3]), U1, V1,
                         gg1, gb1);
        if (need_params) {
          gout.view({g.outc, g.hid}).copy_(accs[6].sum(0).view({g.outc, g.hid}));
          gb.copy_(accs[7].sum(0));
        }
        c.U1 = U1.data(); c.V1 = V1.data();
        run_pass<T, kBwd2>(c, accs, dxp);
        norm_backward<T>(n0, g.N, g.C, g.L, mu0, rs0, summed(accs[0]), summed(accs[1]), U0, V0,
                         gg0, gb0);
        if (need_params) {
          gdw.view({g.C, g.P}).copy_(accs[4].sum(0).view({g.C, g.P}));
          gpw.view({g.hid, g.C}).copy_(accs[5].sum(0).view({g.hid, g.C}));
        }
        c.U0 = U0.data(); c.V0 = V0.data();
        run_pass<T, kBwd3>(c, accs, dxp);
        if (need_params) gdw.view({g.C, g.P}).add_(accs[4].sum(0).view({g.C, g.P}));
      } else {
        c.sums = norm == kRunning && need_params;
        run_pass<T, kBwdOne>(c, accs, dxp);
        if (c.sums) {
          norm_backward<T>(n1, g.N, g.hid, g.L, mu1, rs1, summed(accs[2]), summed(accs[3]), U1,
                           V1, gg1, gb1);
          norm_backward<T>(n0, g.N, g.C, g.L, mu0, rs0, summed(accs[0]), summed(accs[1]), U0,
                           V0, gg0, gb0);
        }
        if (need_params) {
          gout.view({g.outc, g.hid}).copy_(accs[6].sum(0).view({g.outc, g.hid}));
          gb.copy_(accs[7].sum(0));
          gdw.view({g.C, g.P}).copy_(accs[4].sum(0).view({g.C, g.P}));
          gpw.view({g.hid, g.C}).copy_(accs[5].sum(0).view({g.hid, g.C}));
        }
      }
    });
  }
  auto back = [&](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t.to(like.scalar_type()) : x_in.new_empty({0});
  };
  auto back_opt = [&](const at::Tensor& t, const Opt& like) {
    return t.defined() && like.has_value() && like->defined() ? t.to(like->scalar_type())
                                                              : x_in.new_empty({0});
  };
  return {back(dx, x_in),          back(gdw, dw_in),         back(gpw, pw_in),
          back(gout, out_in),      back(gb, out_in),         back_opt(gg0, weight0),
          back_opt(gb0, bias0),    back_opt(gg1, weight1),   back_opt(gb1, bias1)};
}

}  // namespace
}  // namespace light
}  // namespace nsl

TORCH_LIBRARY_IMPL(nsl, CPU, m) {
  m.impl("light_predictor", TORCH_FN(nsl::light::forward_cpu));
  m.impl("light_predictor_backward", TORCH_FN(nsl::light::backward_cpu));
}
