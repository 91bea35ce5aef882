// pyfast._cuda: the CUDA kernels, on raw device pointers (uintptr_t), sizes and the caller's
// stream handle (torch.cuda.Stream.cuda_stream). No libtorch. Importing this module makes no
// CUDA call, so it loads on machines without a driver or GPU (cudart is linked statically and
// reaches the driver only when a kernel is launched).
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "cuda/moe/moe_cuda.h"

#ifndef PYFAST_CUDA_ARCHS
#define PYFAST_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void check_launch(const char* op, cudaError_t err) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pyfast._cuda.") + op + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

int runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess || version <= 0) {
    version = CUDART_VERSION;
  }
  return version;
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    version = 0;
  }
  return version;
}

void moe_route(std::uintptr_t experts, std::int64_t tokens, int k, int num_experts, std::int64_t capacity,
               std::int64_t align, std::int64_t num_rows, std::uintptr_t counts, std::uintptr_t offsets,
               std::uintptr_t row_of_assignment, std::uintptr_t assignment_of_row, std::uintptr_t bad_ids,
               std::uintptr_t workspace, std::uintptr_t stream) {
  if (tokens < 0) throw py::value_error("moe_route: tokens must be >= 0, got " + std::to_string(tokens));
  if (k < 1) throw py::value_error("moe_route: k must be >= 1, got " + std::to_string(k));
  if (num_experts < 1 || num_experts > pyfast::cuda::kRouteMaxExperts) {
    throw py::value_error("moe_route: num_experts must be in [1, " + std::to_string(pyfast::cuda::kRouteMaxExperts) +
                          "], got " + std::to_string(num_experts));
  }
  if (capacity < 0) throw py::value_error("moe_route: capacity must be >= 0 (0 = none), got " + std::to_string(capacity));
  if (align < 0) throw py::value_error("moe_route: align must be >= 0 (0 = none), got " + std::to_string(align));
  if (num_rows < 0) throw py::value_error("moe_route: num_rows must be >= 0, got " + std::to_string(num_rows));
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = pyfast::cuda::moe_route(ptr<const std::int32_t>(experts), tokens, k, num_experts, capacity, align, num_rows,
                                  ptr<std::int64_t>(counts), ptr<std::int64_t>(offsets),
                                  ptr<std::int64_t>(row_of_assignment), ptr<std::int64_t>(assignment_of_row),
                                  ptr<std::int32_t>(bad_ids), ptr<std::int64_t>(workspace), stream_of(stream));
  }
  check_launch("moe_route", err);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfast CUDA kernels (raw device pointers, sizes and a cudaStream_t handle; no libtorch)";

  m.def("runtime_version", &runtime_version,
        "CUDA runtime version as an int (e.g. 13000); the compiled CUDART_VERSION when the runtime cannot say");
  m.def("driver_version", &driver_version, "Latest CUDA version the installed driver supports; 0 without a driver");
  m.def("archs", []() { return std::string(PYFAST_CUDA_ARCHS); }, "CUDA architectures this module was built for");

  m.def("moe_route_workspace", &pyfast::cuda::moe_route_workspace_elems, py::arg("tokens"), py::arg("k"),
        py::arg("num_experts"), "int64 elements of scratch memory moe_route needs");
  m.def("moe_route", &moe_route, py::arg("experts"), py::arg("tokens"), py::arg("k"), py::arg("num_experts"),
        py::arg("capacity"), py::arg("align"), py::arg("num_rows"), py::arg("counts"), py::arg("offsets"),
        py::arg("row_of_assignment"), py::arg("assignment_of_row"), py::arg("bad_ids"), py::arg("workspace"),
        py::arg("stream"),
        "Group (tokens, k) int32 expert ids by expert (pyfast.moe.reference.route). Pointers: experts (T*k) int32; "
        "counts (E) int64; offsets (E+1) int64; row_of_assignment (T*k) int64; assignment_of_row (num_rows) int64; "
        "bad_ids int32 scalar; workspace moe_route_workspace(T, k, E) int64. Enqueued on `stream`, never synchronizes.");
  m.attr("MAX_ROUTE_EXPERTS") = pyfast::cuda::kRouteMaxExperts;
}
