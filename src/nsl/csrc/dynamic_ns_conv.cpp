// nsl: fused CPU kernel for dynamic neural similarity convolution, the Python binding.
// Overview in kernel.h; the sources are split by job (listed there).
#include <torch/extension.h>

#include "gemm.h"
#include "geometry.h"
#include "kernel.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace nsl;
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
