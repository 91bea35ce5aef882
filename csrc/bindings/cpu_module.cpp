// pyfast._C: the CPU kernels. Every function takes raw addresses (tensor.data_ptr()), sizes,
// row strides in elements and dtype tags (pyfast/_ext.py DTYPE_TAG); nothing here links libtorch.
// Each family registers its kernels from csrc/bindings/cpu_<family>.cpp.
#include <pybind11/pybind11.h>

#include "bindings/cpu_bindings.h"
#include "common/parallel.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast CPU kernels (raw pointers, sizes, strides, dtype tags; no libtorch)";
  m.def("max_threads", &pyfast::max_threads, "OpenMP threads available to the kernels");
  pyfast::bindings::register_moe(m);
  pyfast::bindings::register_ssm(m);
  pyfast::bindings::register_quant(m);
  pyfast::bindings::register_gp(m);
}
