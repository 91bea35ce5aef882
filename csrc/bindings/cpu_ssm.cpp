// pyfast._C bindings of the SSM kernels (csrc/cpu/ssm).
#include "bindings/cpu_bindings.h"
#include "cpu/ssm/ssm.h"

namespace py = pybind11;

namespace pyfast::bindings {

void register_ssm(py::module_& m) {
  namespace cpu = pyfast::cpu;
  m.def("ssm_vandermonde_fwd", [](int dtype, Address W, Address w, std::int64_t channels, std::int64_t H,
                                  std::int64_t N, std::int64_t L, Address K) {
    py::gil_scoped_release release;
    cpu::ssm_vandermonde_fwd(dtype, at<const void>(W), at<const void>(w), channels, H, N, L, at<void>(K));
  });
  m.def("ssm_vandermonde_bwd", [](int dtype, Address grad, Address w, std::int64_t channels, std::int64_t H,
                                  std::int64_t N, std::int64_t L, Address S0, Address S1) {
    py::gil_scoped_release release;
    cpu::ssm_vandermonde_bwd(dtype, at<const void>(grad), at<const void>(w), channels, H, N, L, at<void>(S0),
                             at<void>(S1));
  });
}

}  // namespace pyfast::bindings
