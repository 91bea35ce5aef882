// Shared pieces of the pyfast._C bindings: one register_<family>(m) per family, each in
// csrc/bindings/cpu_<family>.cpp, all called from cpu_module.cpp.
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

namespace pyfast::bindings {

using Address = std::uintptr_t;

template <typename T>
T* at(Address address) {
  return reinterpret_cast<T*>(address);
}

void register_moe(pybind11::module_& m);
void register_ssm(pybind11::module_& m);
void register_quant(pybind11::module_& m);
void register_gp(pybind11::module_& m);

}  // namespace pyfast::bindings
