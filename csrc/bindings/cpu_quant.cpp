// pyfast._C bindings of the power-exponent quantization kernels (csrc/cpu/quant).
#include "bindings/cpu_bindings.h"
#include "cpu/quant/quant.h"

namespace py = pybind11;

namespace pyfast::bindings {
namespace {

// table_index 0: one table (tables == 1).
cpu::QuantWeight weight(Address codes, std::int64_t rows, std::int64_t cols, std::int64_t row_bytes, Address scales,
                        std::int64_t group_size, Address table, int bits, Address table_index, int tables) {
  return {at<const std::uint8_t>(codes), rows, cols, row_bytes, at<const float>(scales), group_size,
          at<const float>(table), bits, at<const std::uint8_t>(table_index), tables};
}

}  // namespace

void register_quant(py::module_& m) {
  m.def("quant_power_linear_fwd",
        [](int dtype, Address x, std::int64_t M, std::int64_t x_stride, Address codes, std::int64_t N, std::int64_t K,
           std::int64_t row_bytes, Address scales, std::int64_t group_size, Address table, int bits,
           Address table_index, int tables, Address y, std::int64_t y_stride) {
          py::gil_scoped_release release;
          cpu::quant_power_linear_fwd(dtype, at<const void>(x), M, x_stride,
                                      weight(codes, N, K, row_bytes, scales, group_size, table, bits, table_index, tables),
                                      at<void>(y), y_stride);
        });
  m.def("quant_dequantize", [](int dtype, Address codes, std::int64_t N, std::int64_t K, std::int64_t row_bytes,
                               Address scales, std::int64_t group_size, Address table, int bits, Address table_index,
                               int tables, Address out) {
    py::gil_scoped_release release;
    cpu::quant_dequantize(dtype, weight(codes, N, K, row_bytes, scales, group_size, table, bits, table_index, tables),
                          at<void>(out));
  });
}

}  // namespace pyfast::bindings
