// nsl CPU kernel: the forward pass (see kernel.h for the overview).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "gemm.h"
#include "kernel.h"
#include "profile.h"
#include "tiles.h"

namespace nsl {

namespace {

// out[n, :, t0:t0+len] for all groups. ws: workspace_size(g, 2) elements.
template <typename scalar_t>
NSL_INLINE void forward_tile_body(const Args<scalar_t>& a, int64_t n, int64_t tile, scalar_t* out,
                                  scalar_t* ws, Tile& tl) {
  const Geom& g = *a.g;
  const int64_t t0 = tile * g.T, ld = g.T;
  tl.set(g, t0, std::min(g.T, g.L - t0));
  scalar_t* B = ws;
  scalar_t* C = ws + g.K * g.T;
  scalar_t* colok = nullptr;  // column masks (shift path)
  if (g.shift_path) {
    colok = ws + 2 * g.K * g.T + pack_size(g);
    column_masks<scalar_t>(g, tl, ld, colok);
  }
  // Diagonal: the tile of m, copied with rows sim_ld apart (see sim_ld); the full layout's mix
  // reads M straight (it packs it anyway).
  const scalar_t* simt = a.sim + n * a.sim_stride + t0;
  int64_t lm = g.L;
  if (!a.full) {
    NSL_PHASE(kFwdBuild);
    scalar_t* copy = ws + 2 * g.K * g.T + pack_size(g) + g.kw * g.T;
    lm = sim_ld(g);
    copy_rows(simt, g.L, copy, lm, g.P, tl.len);
    simt = copy;
  }
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const scalar_t* xg = a.x + (n * g.C_in + grp * g.cin_g) * g.H * g.W;
    if (a.full) {
      {
        NSL_PHASE(kFwdBuild);
        build_cols<scalar_t>(g, tl, xg, nullptr, 0, ld, C, colok);
      }
      NSL_PHASE(kFwdMix);
      mix_positions<scalar_t>(g, simt, lm, false, tl.len, C, B, ld, ws + 2 * g.K * g.T);
    } else {
      NSL_PHASE(kFwdBuild);
      build_cols<scalar_t>(g, tl, xg, simt, lm, ld, B, colok);
    }
    const scalar_t* wg = a.w + grp * g.cout_g * g.K;
    scalar_t* og = out + (n * g.C_out + grp * g.cout_g) * g.L + t0;
    NSL_PHASE(kFwdGemm);
    gemm_nn<scalar_t>(g.cout_g, tl.len, g.K, wg, g.K, B, ld, false, og, g.L);
  }
}

NSL_MULTIVERSION void forward_tile(const Args<float>& a, int64_t n, int64_t tile, float* out, float* ws,
                                   Tile& tl) {
  forward_tile_body(a, n, tile, out, ws, tl);
}

void forward_tile(const Args<double>& a, int64_t n, int64_t tile, double* out, double* ws, Tile& tl) {
  forward_tile_body(a, n, tile, out, ws, tl);
}


}  // namespace

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
            forward_tile(a, it, tile, o, ws.data(), tl);
        } else {
          forward_tile(a, it / g.ntiles, it % g.ntiles, o, ws.data(), tl);
        }
      }
    });
  });
  return out;
}


}  // namespace nsl
