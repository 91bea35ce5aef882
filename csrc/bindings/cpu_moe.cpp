// pyfast._C bindings of the MoE kernels (csrc/cpu/moe).
#include "bindings/cpu_bindings.h"
#include "common/memory.h"
#include "cpu/moe/moe.h"

namespace py = pybind11;

namespace pyfast::bindings {

void register_moe(py::module_& m) {
  namespace cpu = pyfast::cpu;
  m.def("moe_topk_gating_fwd",
        [](int dtype, Address logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride, int k,
           bool softmax, Address temperature, bool renormalize, Address bias, Address weights, Address choices,
           bool check) {
          py::gil_scoped_release release;
          return cpu::moe_topk_gating_fwd(dtype, at<const void>(logits), tokens, experts, stride, k, softmax,
                                          at<const void>(temperature), renormalize, at<const void>(bias),
                                          at<void>(weights), at<std::int32_t>(choices), check);
        });
  m.def("moe_topk_gating_bwd",
        [](int dtype, Address grad, Address logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride,
           Address choices, int k, bool softmax, Address temperature, bool renormalize, Address grad_logits) {
          py::gil_scoped_release release;
          cpu::moe_topk_gating_bwd(dtype, at<const void>(grad), at<const void>(logits), tokens, experts, stride,
                                   at<const std::int32_t>(choices), k, softmax, at<const void>(temperature),
                                   renormalize, at<void>(grad_logits));
        });
  m.def("moe_route",
        [](Address choices, std::int64_t tokens, int k, std::int64_t experts, std::int64_t capacity,
           std::int64_t align, std::int64_t rows, Address counts, Address offsets, Address row_of_assignment,
           Address assignment_of_row) {
          py::gil_scoped_release release;
          return cpu::moe_route(at<const std::int32_t>(choices), tokens, k, experts, capacity, align, rows,
                                at<std::int64_t>(counts), at<std::int64_t>(offsets),
                                at<std::int64_t>(row_of_assignment), at<std::int64_t>(assignment_of_row));
        });
  m.def("moe_gather_rows", [](int dtype, Address x, std::int64_t d, std::int64_t stride, Address assignment_of_row,
                              std::int64_t rows, int k, Address scale, Address out) {
    py::gil_scoped_release release;
    cpu::moe_gather_rows(dtype, at<const void>(x), d, stride, at<const std::int64_t>(assignment_of_row), rows, k,
                         at<const void>(scale), at<void>(out));
  });
  m.def("moe_combine_rows", [](int dtype, Address y, std::int64_t d, std::int64_t stride, Address row_of_assignment,
                               std::int64_t tokens, int k, Address weights, Address out) {
    py::gil_scoped_release release;
    cpu::moe_combine_rows(dtype, at<const void>(y), d, stride, at<const std::int64_t>(row_of_assignment), tokens, k,
                          at<const void>(weights), at<void>(out));
  });
  m.def("moe_combine_weights_grad",
        [](int dtype, Address grad_out, std::int64_t grad_stride, Address y, std::int64_t y_stride, std::int64_t d,
           Address row_of_assignment, std::int64_t tokens, int k, Address grad_weights) {
          py::gil_scoped_release release;
          cpu::moe_combine_weights_grad(dtype, at<const void>(grad_out), grad_stride, at<const void>(y), y_stride, d,
                                        at<const std::int64_t>(row_of_assignment), tokens, k,
                                        at<void>(grad_weights));
        });
  m.def("moe_router_lse_square_sum",
        [](int dtype, Address logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride) {
          py::gil_scoped_release release;
          return cpu::moe_router_lse_square_sum(dtype, at<const void>(logits), tokens, experts, stride);
        });
  m.def("moe_router_z_loss_bwd", [](int dtype, Address logits, std::int64_t tokens, std::int64_t experts,
                                    std::int64_t stride, Address scale, Address grad_logits) {
    py::gil_scoped_release release;
    cpu::moe_router_z_loss_bwd(dtype, at<const void>(logits), tokens, experts, stride, at<const void>(scale),
                               at<void>(grad_logits));
  });
  m.def("moe_expert_gemm_available", &cpu::moe_expert_gemm_available);
  // Huge-page advice for a large fresh output that torch code fills (the expert weight gradients).
  m.def("moe_advise_huge_pages", [](Address data, std::size_t bytes) { advise_huge_pages(at<void>(data), bytes); });
  m.def("moe_expert_gemm",
        [](int dtype, Address a, std::int64_t a_stride, Address assignment_of_row, int k, Address w,
           std::int64_t w_expert_stride, std::int64_t w_n_stride, std::int64_t w_k_stride, std::int64_t n,
           std::int64_t depth, Address counts, Address offsets, std::int64_t experts, std::int64_t rows, Address out,
           std::int64_t out_stride) {
          py::gil_scoped_release release;
          cpu::moe_expert_gemm(dtype, at<const void>(a), a_stride, at<const std::int64_t>(assignment_of_row), k,
                               at<const void>(w), w_expert_stride, w_n_stride, w_k_stride, n, depth,
                               at<const std::int64_t>(counts), at<const std::int64_t>(offsets), experts, rows,
                               at<void>(out), out_stride);
        });
}

}  // namespace pyfast::bindings
