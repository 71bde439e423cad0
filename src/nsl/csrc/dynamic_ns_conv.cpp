// nsl: fused CPU kernel for dynamic neural similarity convolution, its registration with the dispatcher.
// Overview in kernel.h; the sources are split by job (listed there).
//
// The operators nsl::dynamic_ns_conv2d and nsl::dynamic_ns_conv2d_backward are *defined* in Python
// (nsl/_ops.py: they must exist without a compiler, for the pure-PyTorch fallback, the Triton kernels on
// CUDA and the fake kernels); this library only adds their CPU kernels (as torchvision's
// csrc/ops/cpu/*_kernel.cpp do), so loading it (torch.ops.load_library) makes the dispatcher send CPU
// tensors here. bfloat16/float16 inputs are computed in float32 and the results cast back. A few tuning
// knobs for tests and benchmarks are operators of their own namespace, nsl_cpu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "gemm.h"
#include "geometry.h"
#include "kernel.h"
#include "profile.h"

namespace nsl {
namespace {

// The dtype the kernel computes in for an input dtype: float32 for bfloat16/float16, else itself.
at::Tensor computable(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == at::kBFloat16 || dtype == at::kHalf ? t.to(at::kFloat) : t).contiguous();
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  at::Tensor out = forward(computable(x), computable(w), computable(sim), stride.vec(), padding.vec(),
                           dilation.vec(), groups);
  return out.to(x.scalar_type());
}

// (dx, dweight, dsim) in the inputs' dtypes; a gradient not asked for is an empty tensor (an operator
// cannot return None).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& sim,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool need_dx, bool need_dw, bool need_dsim) {
  std::vector<at::Tensor> grads =
      backward(computable(grad_out), computable(x), computable(w), computable(sim), stride.vec(),
               padding.vec(), dilation.vec(), groups, need_dx, need_dw, need_dsim);
  const at::Tensor* inputs[3] = {&x, &w, &sim};
  for (int k = 0; k < 3; ++k) {
    grads[k] = grads[k].defined() ? grads[k].to(inputs[k]->scalar_type()) : x.new_empty({0});
  }
  return {grads[0], grads[1], grads[2]};
}

}  // namespace
}  // namespace nsl

TORCH_LIBRARY_IMPL(nsl, CPU, m) {
  m.impl("dynamic_ns_conv2d", TORCH_FN(nsl::forward_cpu));
  m.impl("dynamic_ns_conv2d_backward", TORCH_FN(nsl::backward_cpu));
}

// Tuning (tests, benchmarks); each returns the previous value.
TORCH_LIBRARY(nsl_cpu, m) {
  m.def("set_tile_bytes(int bytes) -> int", &nsl::set_tile_bytes);        // bytes targeted per column tile
  m.def("set_min_tile(int locations) -> int", &nsl::set_min_tile);        // fewest output locations per tile
  m.def("set_gemm_backend(int backend) -> int", &nsl::set_gemm_backend);  // 0 best, 1 BLAS, 2 at::mm
  m.def("gemm_backends() -> str[]", &nsl::gemm_backends);                 // available, fastest first
#ifdef NSL_PROFILE
  m.def("phase_names() -> str[]", [] {  // profiling builds only (see profile.h)
    return std::vector<std::string>(nsl::kPhaseNames, nsl::kPhaseNames + nsl::kNumPhases);
  });
  m.def("phase_times() -> float[]", [] {  // milliseconds per phase, summed over threads
    std::vector<double> r;
    for (auto& ns : nsl::g_phase_ns) r.push_back(1e-6 * ns.load());
    return r;
  });
  m.def("reset_phase_times() -> ()", [] {
    for (auto& ns : nsl::g_phase_ns) ns.store(0);
  });
#endif
}
