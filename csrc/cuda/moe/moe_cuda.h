// CUDA launchers of pyfast.moe (framework-free: raw device pointers, sizes, the caller's stream).
//
// Every launcher enqueues its work on `stream` and returns without synchronizing; the return
// value is the launch status (cudaSuccess, or the first error a launch reported).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace pyfast {
namespace cuda {

// Largest num_experts the route kernels handle (one thread per expert in the offsets scan).
constexpr int kRouteMaxExperts = 512;

// int64 elements of scratch memory moe_route needs for (tokens, k, num_experts); may be 0.
int64_t moe_route_workspace_elems(int64_t tokens, int k, int num_experts);

// Groups the (tokens, k) expert choices by expert, exactly as pyfast.moe.reference.route:
//   experts            (tokens, k) int32, contiguous, device
//   capacity           keep at most this many assignments per expert (0 = unlimited)
//   align              segment starts are multiples of align (0 = none)
//   num_rows           R, length of assignment_of_row (pyfast.moe.routing.num_rows)
//   counts             (E,) int64 out: kept assignments per expert
//   offsets            (E + 1,) int64 out: segment starts, offsets[E] = rows in use
//   row_of_assignment  (tokens * k,) int64 out: row of assignment t*k+j, -1 when dropped
//   assignment_of_row  (R,) int64 out: t*k+j held by each row, -1 for padding / unused rows
//   bad_ids            int32 device scalar out: number of ids outside [0, E) (outputs are then
//                      unspecified, but every write stays in bounds)
//   workspace          moe_route_workspace_elems(tokens, k, E) int64 elements of scratch
// Deterministic: positions never depend on the order in which threads run.
cudaError_t moe_route(const int32_t* experts, int64_t tokens, int k, int num_experts, int64_t capacity,
                      int64_t align, int64_t num_rows, int64_t* counts, int64_t* offsets,
                      int64_t* row_of_assignment, int64_t* assignment_of_row, int32_t* bad_ids,
                      int64_t* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyfast
