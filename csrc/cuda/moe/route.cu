// pyfast.moe route on the GPU: group the (T, k) expert choices by expert.
//
// Spec: pyfast/moe/reference.py `route`. Priority of assignment (t, j) is p = j * T + t (every
// slot-0 choice before any slot-1 choice, tokens in order within a slot); an assignment's
// position inside its expert is the number of same-expert assignments of lower priority; with a
// capacity only positions < capacity are kept; expert e owns rows offsets[e] + [0, counts[e]).
//
// The priority axis is cut into units u = j * S + s (S = ceil(T / L) segments of L tokens), so
// units in increasing u cover increasing priorities. Four kernels, no order-dependent atomics:
//   1. count:   one warp per unit walks its L tokens 32 at a time in token order. __match_any_sync
//               groups equal ids; a lane's rank in the unit is the per-warp shared counter of its
//               expert plus the number of lower lanes with the same id. The rank goes to
//               row_of_assignment (scratch until kernel 4), the unit's histogram to workspace[u][e].
//   2. scan:    per expert, exclusive scan of workspace[.][e] over u (in place) -> the number of
//               same-expert assignments in earlier units; the total goes to counts[e].
//   3. offsets: one block: counts = min(total, capacity); segments rounded up to align; scan.
//   4. assign:  elementwise over t*k+j: position = workspace[u][e] + rank; row = offsets[e] +
//               position, or -1 when position >= capacity; assignment_of_row[row] = t*k+j.
// assignment_of_row is memset to -1 first (0xFF bytes); bad_ids is memset to 0 and counts ids
// outside [0, E). Bad ids are skipped everywhere, so every write stays in bounds.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/moe/moe_cuda.h"

namespace pyfast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kCountWarps = 8;              // warps (units) per block of the count kernel
constexpr int kCountThreads = kCountWarps * kWarp;
constexpr int kScanThreads = 1024;          // threads per block of the scan kernel
constexpr int kAssignThreads = 256;
constexpr int64_t kAssignMaxBlocks = 65536; // grid-stride beyond this

// Tokens per unit. The workspace holds S * k * E counters, i.e. about k * T * E / L: keeping
// L >= E bounds it by the number of assignments while a warp still has only L / 32 steps.
inline int segment_len(int num_experts) { return num_experts <= 256 ? 256 : 512; }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernel 1: per-unit histogram and in-unit rank of every assignment.
__global__ void __launch_bounds__(kCountThreads)
route_count_kernel(const int32_t* __restrict__ experts, int64_t tokens, int k, int num_experts,
                   int64_t segments, int seg_len, int64_t* __restrict__ unit_counts,
                   int64_t* __restrict__ rank, int32_t* __restrict__ bad_ids) {
  extern __shared__ int32_t s_counters[];  // [kCountWarps][num_experts]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  // Warps of one block take consecutive slots of the same segment (they read the same rows of
  // `experts`); the unit index orders by slot first, like the priority.
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kCountWarps + warp;
  if (g >= segments * k) return;  // whole warp; this kernel has no block-wide barrier
  const int j = static_cast<int>(g % k);
  const int64_t s = g / k;
  const int64_t u = static_cast<int64_t>(j) * segments + s;

  int32_t* counter = s_counters + warp * num_experts;
  for (int e = lane; e < num_experts; e += kWarp) counter[e] = 0;
  __syncwarp();

  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t t0 = s * seg_len;
  int bad = 0;
  for (int64_t base_t = t0; base_t < t0 + seg_len && base_t < tokens; base_t += kWarp) {
    const int64_t t = base_t + lane;
    const bool valid = t < tokens;
    const int32_t e = valid ? experts[t * k + j] : -1;
    const bool good = valid && e >= 0 && e < num_experts;
    const unsigned peers = __match_any_sync(0xffffffffu, good ? e : -1);
    bad += __popc(__ballot_sync(0xffffffffu, valid && !good));
    const int32_t before = good ? counter[e] : 0;
    __syncwarp();  // every lane has read its counter before a leader updates it
    if (good) {
      const int r = __popc(peers & lower_lanes);
      rank[t * k + j] = before + r;
      if (r == 0) counter[e] = before + __popc(peers);
    }
    __syncwarp();
  }
  for (int e = lane; e < num_experts; e += kWarp) unit_counts[u * num_experts + e] = counter[e];
  if (lane == 0 && bad != 0) atomicAdd(bad_ids, bad);
}

// Kernel 2: for each expert, exclusive scan of unit_counts[u][e] over u, in place; totals[e] =
// the expert's assignment count. A block takes `experts_per_block` (a power of two <= 32)
// adjacent experts; the rest of its threads split the unit axis into contiguous parts.
__global__ void __launch_bounds__(kScanThreads)
route_scan_kernel(int64_t* __restrict__ unit_counts, int64_t units, int num_experts, int experts_per_block,
                  int64_t* __restrict__ totals) {
  __shared__ int64_t s_sum[kScanThreads];
  const int tid = threadIdx.x;
  const int parts = kScanThreads / experts_per_block;
  const int part = tid / experts_per_block;
  const int e = blockIdx.x * experts_per_block + tid % experts_per_block;
  const bool active = e < num_experts;
  const int64_t chunk = ceil_div(units, parts);
  const int64_t u0 = min(units, part * chunk);
  const int64_t u1 = min(units, u0 + chunk);

  int64_t sum = 0;
  if (active) {
#pragma unroll 4
    for (int64_t u = u0; u < u1; ++u) sum += unit_counts[u * num_experts + e];
  }
  s_sum[tid] = sum;
  __syncthreads();
  // Inclusive scan over the parts of each expert (stride experts_per_block in s_sum).
  for (int d = 1; d < parts; d *= 2) {
    const int64_t add = part >= d ? s_sum[tid - d * experts_per_block] : 0;
    __syncthreads();
    s_sum[tid] += add;
    __syncthreads();
  }
  if (!active) return;  // no barrier follows
  if (part == parts - 1) totals[e] = s_sum[tid];
  int64_t running = s_sum[tid] - sum;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = unit_counts[u * num_experts + e];
    unit_counts[u * num_experts + e] = running;
    running += c;
  }
}

// Kernel 3 (one block, thread e = expert): capacity, aligned segment sizes, offsets.
__global__ void __launch_bounds__(kRouteMaxExperts)
route_offsets_kernel(int64_t* __restrict__ counts, int num_experts, int64_t capacity, int64_t align,
                     int64_t* __restrict__ offsets) {
  __shared__ int64_t s_seg[kRouteMaxExperts];
  const int e = threadIdx.x;
  int64_t c = 0;
  if (e < num_experts) {
    c = counts[e];
    if (capacity > 0 && c > capacity) c = capacity;
    counts[e] = c;
  }
  s_seg[e] = align > 0 ? (c + align - 1) / align * align : c;
  __syncthreads();
  for (int d = 1; d < kRouteMaxExperts; d *= 2) {
    const int64_t add = e >= d ? s_seg[e - d] : 0;
    __syncthreads();
    s_seg[e] += add;
    __syncthreads();
  }
  if (e < num_experts) offsets[e + 1] = s_seg[e];
  if (e == 0) offsets[0] = 0;
}

// Kernel 4: final row of every assignment and the inverse map.
__global__ void __launch_bounds__(kAssignThreads)
route_assign_kernel(const int32_t* __restrict__ experts, int64_t n, int k, int num_experts, int64_t segments,
                    int seg_len, const int64_t* __restrict__ unit_starts, const int64_t* __restrict__ offsets,
                    int64_t capacity, int64_t num_rows, int64_t* __restrict__ row_of_assignment,
                    int64_t* __restrict__ assignment_of_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t e = experts[i];
    int64_t row = -1;
    if (e >= 0 && e < num_experts) {
      const int64_t t = i / k;
      const int64_t j = i - t * k;
      const int64_t u = j * segments + t / seg_len;
      const int64_t position = unit_starts[u * num_experts + e] + row_of_assignment[i];
      if (capacity <= 0 || position < capacity) {
        row = offsets[e] + position;
        if (row >= 0 && row < num_rows) {
          assignment_of_row[row] = i;
        } else {
          row = -1;  // unreachable for valid ids (offsets[E] <= num_rows); keeps writes in bounds
        }
      }
    }
    row_of_assignment[i] = row;
  }
}

}  // namespace

int64_t moe_route_workspace_elems(int64_t tokens, int k, int num_experts) {
  if (tokens <= 0 || k <= 0 || num_experts <= 0) return 0;
  return ceil_div(tokens, segment_len(num_experts)) * k * num_experts;
}

cudaError_t moe_route(const int32_t* experts, int64_t tokens, int k, int num_experts, int64_t capacity,
                      int64_t align, int64_t num_rows, int64_t* counts, int64_t* offsets,
                      int64_t* row_of_assignment, int64_t* assignment_of_row, int32_t* bad_ids,
                      int64_t* workspace, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || num_experts < 1 || num_experts > kRouteMaxExperts || capacity < 0 || align < 0 ||
      num_rows < 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(bad_ids, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (num_rows > 0) {
    err = cudaMemsetAsync(assignment_of_row, 0xFF, static_cast<size_t>(num_rows) * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
  }
  if (tokens == 0) {
    err = cudaMemsetAsync(counts, 0, static_cast<size_t>(num_experts) * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(offsets, 0, static_cast<size_t>(num_experts + 1) * sizeof(int64_t), stream);
  }

  const int seg_len = segment_len(num_experts);
  const int64_t segments = ceil_div(tokens, seg_len);
  const int64_t units = segments * k;

  const size_t count_smem = static_cast<size_t>(kCountWarps) * num_experts * sizeof(int32_t);
  route_count_kernel<<<static_cast<unsigned>(ceil_div(units, kCountWarps)), kCountThreads, count_smem, stream>>>(
      experts, tokens, k, num_experts, segments, seg_len, workspace, row_of_assignment, bad_ids);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  int experts_per_block = 1;
  while (experts_per_block < num_experts && experts_per_block < kWarp) experts_per_block *= 2;
  route_scan_kernel<<<static_cast<unsigned>(ceil_div(num_experts, experts_per_block)), kScanThreads, 0, stream>>>(
      workspace, units, num_experts, experts_per_block, counts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  route_offsets_kernel<<<1, kRouteMaxExperts, 0, stream>>>(counts, num_experts, capacity, align, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int64_t n = tokens * k;
  const int64_t blocks = ceil_div(n, kAssignThreads) < kAssignMaxBlocks ? ceil_div(n, kAssignThreads) : kAssignMaxBlocks;
  route_assign_kernel<<<static_cast<unsigned>(blocks), kAssignThreads, 0, stream>>>(
      experts, n, k, num_experts, segments, seg_len, workspace, offsets, capacity, num_rows, row_of_assignment,
      assignment_of_row);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyfast
