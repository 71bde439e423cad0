// nsl CPU kernel: argument checks, geometry and tile length (see geometry.h).
#include "geometry.h"

namespace nsl {

namespace {
int64_t g_tile_bytes = 256 * 1024;  // bytes targeted for one [K, T] tile buffer
int64_t g_min_tile = 100;           // fewest output locations per tile, whatever the budget
}  // namespace

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

}  // namespace nsl
