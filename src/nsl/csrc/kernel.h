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
// accumulated transposed), so oneDNN's brgemm kernel can serve them (see gemm.h).
// Work is parallelised over images (at::parallel_for; the GEMMs then run single-threaded inside
// each thread), or over tiles of one image when there are fewer images than threads. Each
// thread owns its workspace and a dW accumulator; dx of an image is written by one thread only
// (per-thread dx buffers in the tile-parallel mode), so there are no races; in the per-image mode
// that thread also zeroes dx[n] just before filling it (no separate zeroing pass). Each tile
// accumulates its part of dsim in rows sim_ld apart (tiles.h) and writes it once (diagonal: it
// also reads a copy of its m so): sim's own rows, L apart, fall in the same L1 sets when L is a
// multiple of 1024 (32 x 32 images) and evicted each other in the loops across positions.
// On the common stride-1 "same" geometry the column rows are contiguous shifted runs of the
// input planes (see Bulk), so building, scattering and the diagonal backward are long
// vectorised loops, with the border columns (reading the padding) dropped by per-tile bit masks
// (column_masks); the P x P products of the full layout are register-blocked for P = 4, 9, 25.
//
// Sources, by job: geometry.h/.cpp (argument checks, geometry, tiling), tiles.h (element-wise
// work on column tiles), gemm.h/.cpp (GEMM backends), forward.cpp, backward.cpp,
// dynamic_ns_conv.cpp (the CPU kernels' registration with the dispatcher, TORCH_LIBRARY_IMPL) and
// profile.h (per-phase timing of a -DNSL_PROFILE build: benchmarks/kernel_phases.py).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <vector>

namespace nsl {

// out [N, C_out, H_out, W_out] = dynamic NS conv(x, w, sim); sim 4-D (diagonal) or 5-D (full).
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
                   std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation, int64_t groups);

// [dx, dweight, dsim] for grad_out [N, C_out, H_out, W_out]; a gradient not asked for is an
// undefined tensor (None).
std::vector<at::Tensor> backward(const at::Tensor& gout_in, const at::Tensor& x,
                                 const at::Tensor& w, const at::Tensor& sim,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                 std::vector<int64_t> dilation, int64_t groups, bool need_dx,
                                 bool need_dw, bool need_dsim);

}  // namespace nsl
