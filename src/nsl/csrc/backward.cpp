// nsl CPU kernel: the backward pass (see kernel.h for the overview).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "gemm.h"
#include "kernel.h"
#include "profile.h"
#include "tiles.h"

namespace nsl {

namespace {

// Where backward_tile's buffers lie in its workspace (elements): the column tile C, H = W^T g, X
// (the full layout's mixes; 32 elements apart, so that equal rows of C, H and X do not fall 4 KiB
// apart), the fixed-P loops' packing area, the column masks, grad_out^T, and the tile-local copy
// of m (diagonal) and accumulator of dsim (rows sim_ld apart, see sim_ld).
struct BwdLayout {
  int64_t C, H, X, pack, colok, gT, S, D, total;  // offsets
  explicit BwdLayout(const Geom& g) {
    const int64_t kt = g.K * g.T + 32;
    C = 0;
    H = C + kt;
    X = H + kt;
    pack = X + kt;
    colok = pack + pack_size(g);
    gT = colok + g.kw * g.T;
    S = gT + g.T * g.cout_g;
    D = S + g.P * sim_ld(g);
    total = D + g.P * g.P * sim_ld(g);
  }
};

// gT[t * cout_g + o] = gg[o * L + t] for t < len: the grad_out tile transposed, in 8 x 8 blocks.
template <typename scalar_t>
NSL_INLINE void transpose_gout(const Geom& g, int64_t len, const scalar_t* gg, scalar_t* gT) {
  const int64_t cout = g.cout_g, L = g.L;
  for (int64_t o0 = 0; o0 < cout; o0 += 8) {
    const int64_t o1 = std::min(cout, o0 + 8);
    for (int64_t t0 = 0; t0 < len; t0 += 8) {
      const int64_t t1 = std::min(len, t0 + 8);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t o = o0; o < o1; ++o) gT[t * cout + o] = gg[o * L + t];
    }
  }
}

// Backward for one tile of image n. gout: [N, C_out, L]; dxn: [C_in, H, W] target for this
// image (or a per-thread buffer); dW: [groups, K, cout_g] accumulator of dW^T; dsim: [N, ...]
// like sim; null pointers mark gradients not needed. ws: lay.total elements.
template <typename scalar_t>
NSL_INLINE void backward_tile_body(const Args<scalar_t>& a, const BwdLayout& lay,
                                   const scalar_t* gout, int64_t n, int64_t tile, scalar_t* dxn,
                                   scalar_t* dW, scalar_t* dsim, scalar_t* ws, Tile& tl) {
  const Geom& g = *a.g;
  const int64_t t0 = tile * g.T, ld = g.T, HW = g.H * g.W;
  tl.set(g, t0, std::min(g.T, g.L - t0));
  const int64_t len = tl.len;
  // dsim's accumulator for the tile, rows lm apart (written out at the end), and, diagonal, sim's
  // tile copied likewise (the full layout's P x P loops read M straight: they pack it anyway).
  const int64_t lm = sim_ld(g), srows = a.full ? g.P * g.P : g.P;
  const int64_t lsim = a.full ? g.L : lm;  // row stride of simt
  const scalar_t* simt = a.full ? a.sim + n * a.sim_stride + t0 : ws + lay.S;
  scalar_t* dsimt = dsim ? ws + lay.D : nullptr;
  {
    NSL_PHASE(kBwdSetup);
    if (!a.full) copy_rows(a.sim + n * a.sim_stride + t0, g.L, ws + lay.S, lm, srows, len);
    for (int64_t r = 0; dsimt && r < srows; ++r)
      std::fill(dsimt + r * lm, dsimt + r * lm + len, scalar_t(0));
  }
  scalar_t* C = ws + lay.C;
  scalar_t* Hb = ws + lay.H;
  scalar_t* X = ws + lay.X;
  scalar_t* pack = ws + lay.pack;
  scalar_t* gT = ws + lay.gT;  // [len, cout_g]
  const scalar_t* colok = g.shift_path ? ws + lay.colok : nullptr;  // column masks
  if (colok) {
    NSL_PHASE(kBwdRows);
    column_masks<scalar_t>(g, tl, ld, ws + lay.colok);
  }
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const scalar_t* xg = a.x + (n * g.C_in + grp * g.cin_g) * HW;
    const scalar_t* gg = gout + (n * g.C_out + grp * g.cout_g) * g.L + t0;
    scalar_t* dxg = dxn ? dxn + grp * g.cin_g * HW : nullptr;
    scalar_t* dWg = dW ? dW + grp * g.K * g.cout_g : nullptr;
    if (dW) {
      NSL_PHASE(kBwdGT);
      transpose_gout<scalar_t>(g, len, gg, gT);
    }
    if (dxg || dsimt) {  // H = W_g^T g_tile: [K, len]
      NSL_PHASE(kBwdGemmH);
      gemm_nn<scalar_t>(g.K, len, g.cout_g, a.wt + grp * g.K * g.cout_g, g.cout_g, gg, g.L, false,
                        Hb, ld);
    }
    const scalar_t* Bw = C;  // the tile W was multiplied with in the forward pass
    if (a.full) {
      if (dsimt || dW) {
        NSL_PHASE(kBwdBuild);
        build_cols<scalar_t>(g, tl, xg, nullptr, 0, ld, C, colok);
      }
      if (dsimt) {
        NSL_PHASE(kBwdDM);
        accumulate_dM<scalar_t>(g, dsimt, lm, len, Hb, C, ld, pack);
      }
      if (dxg) {
        {
          NSL_PHASE(kBwdMixT);
          // sum_p M[p, q] H[c, p]
          mix_positions<scalar_t>(g, simt, lsim, true, len, Hb, X, ld, pack);
        }
        NSL_PHASE(kBwdScatter);
        scatter_cols<scalar_t>(g, tl, dxg, ld, X);
      }
      if (dW) {
        NSL_PHASE(kBwdMix);
        // sum_q M[p, q] C[c, q]
        mix_positions<scalar_t>(g, simt, lsim, false, len, C, X, ld, pack);
        Bw = X;
      }
    } else {
      // One pass over the rows, each staying in L1: build C, dm += H C, C *= m (for dW),
      // H *= m and scatter it into dx.
      NSL_PHASE(kBwdRows);
      for (int64_t c = 0; c < g.cin_g; ++c) {
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t q = i * g.kw + j;
            scalar_t* __restrict cr = C + (c * g.P + q) * ld;
            scalar_t* __restrict hr = Hb + (c * g.P + q) * ld;
            const scalar_t* __restrict mq = simt + q * lm;
            if (g.shift_path) {
              diag_bwd_row_shift<scalar_t>(g, tl, i, j, xg + c * HW, mq, hr,
                                           dsimt ? dsimt + q * lm : nullptr, dW ? cr : nullptr,
                                           dxg ? dxg + c * HW : nullptr, colok + j * ld);
              continue;
            }
            if (dsimt || dW) build_row<scalar_t>(g, tl, i, j, xg + c * HW, nullptr, cr);
            if (dsimt) {
              scalar_t* __restrict d = dsimt + q * lm;
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
      NSL_PHASE(kBwdGemmW);
      gemm_nn<scalar_t>(g.K, g.cout_g, len, Bw, ld, gT, g.cout_g, true, dWg, g.cout_g);
    }
  }
  if (dsimt) {  // the tile's dsim, complete (every group added): written, not accumulated
    NSL_PHASE(kBwdReduce);
    copy_rows(dsimt, lm, dsim + n * a.sim_stride + t0, g.L, srows, len);
  }
}

NSL_MULTIVERSION void backward_tile(const Args<float>& a, const BwdLayout& lay, const float* gout, int64_t n,
                                    int64_t tile, float* dxn, float* dW, float* dsim, float* ws, Tile& tl) {
  backward_tile_body(a, lay, gout, n, tile, dxn, dW, dsim, ws, tl);
}

void backward_tile(const Args<double>& a, const BwdLayout& lay, const double* gout, int64_t n, int64_t tile,
                   double* dxn, double* dW, double* dsim, double* ws, Tile& tl) {
  backward_tile_body(a, lay, gout, n, tile, dxn, dW, dsim, ws, tl);
}


}  // namespace

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
  const int64_t nthreads = at::get_num_threads();
  // One image per work item (dx[n] zeroed by the thread that fills it, while it is hot), or the
  // tiles of one image split across threads when images are fewer than threads.
  const bool per_image = g.N >= nthreads;
  at::Tensor dx, dw, dsim;
  {
    NSL_PHASE(kBwdSetup);
    if (need_dx) dx = per_image ? at::empty_like(x) : at::zeros_like(x);
    if (need_dsim) dsim = at::empty_like(sim);  // every tile writes its part (backward_tile)
    if (need_dw) dw = at::zeros_like(w);
  }
  if (g.N == 0 || !(need_dx || need_dw || need_dsim)) {
    if (dx.defined()) dx.zero_();
    if (dsim.defined()) dsim.zero_();
    return {dx, dw, dsim};
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_ns_conv_backward", [&] {
    // W_g^T for the H = W_g^T g GEMMs (all GEMMs here are untransposed).
    const at::Tensor wt = w.view({g.groups, g.cout_g, g.K}).transpose(1, 2).contiguous();
    const BwdLayout lay(g);
    Args<scalar_t> a{&g, full, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                     wt.data_ptr<scalar_t>(), sim.data_ptr<scalar_t>(), sim.numel() / g.N};
    const scalar_t* go = gout.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dsp = need_dsim ? dsim.data_ptr<scalar_t>() : nullptr;
    const int64_t wsize = g.C_out * g.K, img = g.C_in * g.H * g.W;
    // Per-thread accumulators of dW^T ([groups, K, cout_g] each), summed at the end.
    at::Tensor dw_acc;
    if (need_dw) dw_acc = at::zeros({nthreads, wsize}, w.options());
    scalar_t* dwa = need_dw ? dw_acc.data_ptr<scalar_t>() : nullptr;

    if (per_image) {
      // Each image belongs to one thread: dx[n] is written without races.
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> ws(lay.total);
        Tile tl;
        scalar_t* dWt = dwa ? dwa + at::get_thread_num() * wsize : nullptr;
        for (int64_t n = begin; n < end; ++n) {
          if (dxp) std::fill(dxp + n * img, dxp + (n + 1) * img, scalar_t(0));
          for (int64_t tile = 0; tile < g.ntiles; ++tile)
            backward_tile(a, lay, go, n, tile, dxp ? dxp + n * img : nullptr, dWt, dsp,
                                    ws.data(), tl);
        }
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
          std::vector<scalar_t> ws(lay.total);
          Tile tl;
          const int64_t tid = at::get_thread_num();
          scalar_t* dWt = dwa ? dwa + tid * wsize : nullptr;
          for (int64_t tile = begin; tile < end; ++tile)
            backward_tile(a, lay, go, n, tile, dxa ? dxa + tid * img : nullptr, dWt, dsp,
                                    ws.data(), tl);
        });
        if (need_dx) {
          NSL_PHASE(kBwdReduce);
          dx.select(0, n).view({-1}).copy_(dx_acc.sum(0));
        }
      }
    }
    if (need_dw) {
      NSL_PHASE(kBwdReduce);
      dw.view({g.groups, g.cout_g, g.K})
          .copy_(dw_acc.sum(0).view({g.groups, g.K, g.cout_g}).transpose(1, 2));
    }
  });
  return {dx, dw, dsim};
}


}  // namespace nsl
