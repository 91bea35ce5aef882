// pyfast._C bindings of the GP kernels (csrc/cpu/gp).
#include <vector>

#include <pybind11/stl.h>

#include "bindings/cpu_bindings.h"
#include "cpu/gp/gp.h"

namespace py = pybind11;

namespace pyfast::bindings {
namespace {

// lams: addresses of the float64 eigenvalue vectors, one per factor; sizes: their lengths.
struct Spectrum {
  std::vector<const double*> lams;
  std::vector<std::int64_t> sizes;
  cpu::KronSpectrum view(double noise) const {
    return {lams.data(), sizes.data(), static_cast<int>(lams.size()), noise};
  }
};

Spectrum spectrum_of(const std::vector<Address>& lams, const std::vector<std::int64_t>& sizes) {
  if (lams.empty() || lams.size() != sizes.size()) throw std::invalid_argument("gp spectrum: need one size per factor");
  Spectrum s;
  for (Address a : lams) s.lams.push_back(at<const double>(a));
  s.sizes = sizes;
  return s;
}

}  // namespace

void register_gp(py::module_& m) {
  m.def("gp_scale_by_spectrum", [](int dtype, Address z, std::int64_t cols, const std::vector<Address>& lams,
                                   const std::vector<std::int64_t>& sizes, double noise, double power) {
    const Spectrum s = spectrum_of(lams, sizes);
    py::gil_scoped_release release;
    cpu::gp_scale_by_spectrum(dtype, at<void>(z), cols, s.view(noise), power);
  });
  m.def("gp_kron_eigen_apply_available", &cpu::gp_kron_eigen_apply_available);
  // lams empty: no scaling.
  m.def("gp_kron_eigen_apply", [](int dtype, Address x, Address out, std::int64_t cols, const std::vector<Address>& q,
                                  const std::vector<Address>& qt, const std::vector<std::int64_t>& sizes, bool rotate_in,
                                  bool rotate_out, const std::vector<Address>& lams, double noise, double power) {
    if (q.size() != sizes.size() || qt.size() != sizes.size()) throw std::invalid_argument("gp_kron_eigen_apply: need Q_d and Q_d^T per mode");
    std::vector<const void*> qs, qts;
    for (std::size_t d = 0; d < sizes.size(); ++d) qs.push_back(at<const void>(q[d])), qts.push_back(at<const void>(qt[d]));
    const bool scaled = !lams.empty();
    const Spectrum s = scaled ? spectrum_of(lams, sizes) : Spectrum{};
    const cpu::KronSpectrum view = s.view(noise);
    py::gil_scoped_release release;
    cpu::gp_kron_eigen_apply(dtype, at<const void>(x), at<void>(out), cols, qs.data(), qts.data(), sizes.data(),
                             static_cast<int>(sizes.size()), rotate_in, rotate_out, scaled ? &view : nullptr, power);
  });
  m.def("gp_log_spectrum_sum", [](const std::vector<Address>& lams, const std::vector<std::int64_t>& sizes, double noise) {
    const Spectrum s = spectrum_of(lams, sizes);
    py::gil_scoped_release release;
    return cpu::gp_log_spectrum_sum(s.view(noise));
  });
}

}  // namespace pyfast::bindings
