// Grouped expert GEMM (reference.grouped_mm and the two GEMMs of reference.moe_mlp): for each
// expert e and each row r of its segment [offsets[e], offsets[e] + counts[e]),
//   out[r][n] = sum_k A_r[k] * W_e(n, k),   W_e(n, k) = w[e * se + n * sn + k * sk],
// with A_r = a[r], or the token row x[assignment_of_row[r] / k] (zero for assignment < 0) when the
// gather is fused. Rows outside every segment are zeroed.
//
// Blocking (BLIS-style, float32 compute): a tile is 6 broadcast rows x 16 vector columns
// (common/gemm_tile.h). Work items are (expert, 96 output columns), scheduled dynamically; each thread
// packs (converts to float32, zero-pads) the rows of an expert once and reuses them for every
// item it takes of that expert. Two orientations:
// - weights with unit k-stride (nn.Linear layout, the forward): the 6 broadcast rows are weight
//   rows, read in place (float32) or packed per item into strips [k][6]; the 16 columns are token
//   rows packed k-major [k][16] (a segment's last <= 8 rows run an 8-column tile);
// - other weights (unit n-stride: the input gradients): the 6 broadcast rows are token rows packed
//   [k][6]; the 16 columns are output columns, the item's weight columns packed per 256 k into
//   panels [k][16], partial sums kept in a float32 buffer across the k chunks.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/gemm_tile.h"
#include "common/half.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "cpu/moe/moe.h"

namespace pyfast::cpu {

bool moe_expert_gemm_available() { return has_avx2(); }

#ifdef PYFAST_X86
namespace {

constexpr int kTileRows6 = kTileRows;            // broadcast rows per tile
constexpr int kTileCols16 = kTileCols<float>;    // vector columns per tile: two 8-lane vectors
// Output columns per work item (a multiple of 6 and 16): enough items for dynamic scheduling to
// balance a few large experts, few enough that the packed rows are reused many times.
constexpr std::int64_t kBlockCols = 96;
// Depth per pass when tokens are broadcast (the item's packed weights: 96 KiB).
constexpr std::int64_t kDepthChunk = 256;
// Weight rows read ahead while packing rows of a transposed weight.
constexpr std::int64_t kPrefetchRows = 16;

struct GroupedGemm {
  const void* a;
  std::int64_t a_stride;
  const std::int64_t* assignment_of_row;  // fused gather when not null
  int k;
  const void* w;
  std::int64_t se, sn, sk;
  std::int64_t n, depth;
  const std::int64_t* counts;
  const std::int64_t* offsets;
  void* out;
  std::int64_t out_stride;
};

// The tile for `width` (8 or 16) vector columns.
inline void tile_for(int width, const float* b, std::int64_t rs, std::int64_t nb, std::int64_t ks, const float* p,
                     std::int64_t ps, std::int64_t depth, bool accumulate, float* acc) {
  if (width == kTileCols16) {
    gemm_tile<float, 2>(b, rs, nb, ks, p, ps, depth, accumulate, acc);
  } else {
    gemm_tile<float, 1>(b, rs, nb, ks, p, ps, depth, accumulate, acc);
  }
}

// out[i * si + t * st] = acc[i][t] for i < ni, t < nt.
template <typename T>
void store_tile(const float* acc, T* out, std::int64_t si, std::int64_t st, std::int64_t ni, std::int64_t nt) {
  for (std::int64_t i = 0; i < ni; ++i) {
    for (std::int64_t t = 0; t < nt; ++t) out[i * si + t * st] = from_acc<T>(acc[i * kTileCols16 + t]);
  }
}

// Source row of output row r, or null for a padding row (zero input).
template <typename T>
const T* row_source(const GroupedGemm& g, std::int64_t r) {
  const T* a = static_cast<const T*>(g.a);
  if (g.assignment_of_row == nullptr) return a + r * g.a_stride;
  const std::int64_t assignment = g.assignment_of_row[r];
  return assignment < 0 ? nullptr : a + (assignment / g.k) * g.a_stride;
}

// Vector width (8 or 16) of the column block starting at c0 of `count` columns: a last block of
// at most 8 runs the 8-column tile.
inline int block_width(std::int64_t c0, std::int64_t count) { return count - c0 <= 8 ? 8 : kTileCols16; }

// Rows [first, first + count) as float32 blocks of `step` rows (16, or 6), each k-major
// [k][width] with width = block_width for 16-row blocks and 6 otherwise, zero-padded; block j at
// j * depth * step.
template <typename T>
void pack_rows(const GroupedGemm& g, std::int64_t first, std::int64_t count, int step, float* out) {
  for (std::int64_t r0 = 0; r0 < count; r0 += step, out += g.depth * step) {
    const int width = step == kTileCols16 ? block_width(r0, count) : step;
    for (int t = 0; t < width; ++t) {
      const T* src = r0 + t < count ? row_source<T>(g, first + r0 + t) : nullptr;
      float* dst = out + t;
      if (src == nullptr) {
        for (std::int64_t kk = 0; kk < g.depth; ++kk) dst[kk * width] = 0.0f;
      } else {
        for (std::int64_t kk = 0; kk < g.depth; ++kk) dst[kk * width] = to_acc(src[kk]);
      }
    }
  }
}

// Columns [n0, n0 + cols) and depths [k0, k0 + kc) of W_e as float32 blocks of `step` columns
// (6 or 16), each k-major [k][width] (width = step, or block_width for 16), zero-padded; block j
// at j * kc * step. Weights are read along their rows: along k for unit k-stride, else k outer.
template <typename T, bool UnitN>
void pack_weights(const GroupedGemm& g, std::int64_t e, std::int64_t n0, std::int64_t cols, std::int64_t k0,
                  std::int64_t kc, int step, float* out) {
  const T* w = static_cast<const T*>(g.w) + e * g.se + n0 * g.sn + k0 * g.sk;
  const std::int64_t sn = UnitN ? 1 : g.sn;
  if (!UnitN && g.sk == 1) {  // nn.Linear layout: read each weight row along k
    for (std::int64_t c0 = 0; c0 < cols; c0 += step) {
      const int width = step == kTileCols16 ? block_width(c0, cols) : step;
      for (int t = 0; t < width; ++t) {
        float* dst = out + c0 * kc + t;
        const T* src = w + (c0 + t) * sn;
        const bool valid = c0 + t < cols;
        for (std::int64_t kk = 0; kk < kc; ++kk) dst[kk * width] = valid ? to_acc(src[kk]) : 0.0f;
      }
    }
    return;
  }
  for (std::int64_t kk = 0; kk < kc; ++kk) {
    const T* src = w + kk * g.sk;
    if constexpr (UnitN) {
      // Each weight row is a separate stream that the hardware prefetchers do not follow (rows
      // are pages apart): ask for the row kPrefetchRows ahead (prefetches never fault).
      for (std::int64_t c = 0; c < cols; c += 64 / sizeof(T)) __builtin_prefetch(src + kPrefetchRows * g.sk + c);
    }
    for (std::int64_t c0 = 0; c0 < cols; c0 += step) {
      const int width = step == kTileCols16 ? block_width(c0, cols) : step;
      float* dst = out + c0 * kc + kk * width;
      if (c0 + width <= cols) {
        for (int t = 0; t < width; ++t) dst[t] = to_acc(src[(c0 + t) * sn]);
      } else {
        for (int t = 0; t < width; ++t) dst[t] = c0 + t < cols ? to_acc(src[(c0 + t) * sn]) : 0.0f;
      }
    }
  }
}

template <typename T>
void pack_weight_blocks(const GroupedGemm& g, std::int64_t e, std::int64_t n0, std::int64_t cols, std::int64_t k0,
                        std::int64_t kc, int step, float* out) {
  if (g.sn == 1) {
    pack_weights<T, true>(g, e, n0, cols, k0, kc, step, out);
  } else {
    pack_weights<T, false>(g, e, n0, cols, k0, kc, step, out);
  }
}

template <typename T>
void zero_gaps(const GroupedGemm& g, std::int64_t experts, std::int64_t rows) {
  T* out = static_cast<T*>(g.out);
  std::vector<std::pair<std::int64_t, std::int64_t>> segments;
  for (std::int64_t e = 0; e < experts; ++e) {
    if (g.counts[e] > 0) segments.emplace_back(g.offsets[e], g.offsets[e] + g.counts[e]);
  }
  std::sort(segments.begin(), segments.end());
  segments.emplace_back(rows, rows);
  std::int64_t previous = 0;
  for (const auto& [start, end] : segments) {
    for (std::int64_t r = previous; r < start; ++r) std::memset(static_cast<void*>(out + r * g.out_stride), 0, sizeof(T) * g.n);
    previous = std::max(previous, end);
  }
}

template <typename T>
void grouped_gemm(const GroupedGemm& g, std::int64_t experts, std::int64_t rows) {
  advise_huge_pages(g.out, static_cast<std::size_t>(rows * g.out_stride) * sizeof(T));
  zero_gaps<T>(g, experts, rows);
  if (g.n == 0) return;
  const bool broadcast_weights = g.sk == 1;
  const bool weights_in_place = broadcast_weights && std::is_same_v<T, float>;
  // Token rows are packed in blocks of the tile's vector columns or of its broadcast rows.
  const int row_step = broadcast_weights ? kTileCols16 : kTileRows6;
  const std::int64_t blocks = (g.n + kBlockCols - 1) / kBlockCols;
  std::vector<std::int64_t> item_expert;  // work item i: expert item_expert[i], block i - first_item[e]
  std::vector<std::int64_t> first_item(experts);
  std::int64_t max_count = 0;
  for (std::int64_t e = 0; e < experts; ++e) {
    first_item[e] = static_cast<std::int64_t>(item_expert.size());
    if (g.counts[e] <= 0) continue;
    max_count = std::max(max_count, g.counts[e]);
    item_expert.insert(item_expert.end(), blocks, e);
  }
  const std::int64_t items = static_cast<std::int64_t>(item_expert.size());
  if (items == 0) return;
  const std::int64_t packed_rows = (max_count + row_step - 1) / row_step * row_step;
  T* out = static_cast<T*>(g.out);

PYFAST_OMP(omp parallel if (items > 1))
  {
    std::vector<float> xp(static_cast<std::size_t>(packed_rows * g.depth));
    std::vector<float> wp(weights_in_place ? 0 : static_cast<std::size_t>(kBlockCols * (broadcast_weights ? g.depth : kDepthChunk)));
    std::vector<float> block_acc(broadcast_weights ? 0 : static_cast<std::size_t>(packed_rows * kBlockCols));
    alignas(32) float acc[kTileRows6 * kTileCols16];
    std::int64_t packed_expert = -1;
PYFAST_OMP(omp for schedule(dynamic, 1))
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t e = item_expert[item];
      const std::int64_t first = g.offsets[e], count = g.counts[e];
      if (e != packed_expert) {
        pack_rows<T>(g, first, count, row_step, xp.data());
        packed_expert = e;
      }
      const std::int64_t n_begin = (item - first_item[e]) * kBlockCols;
      const std::int64_t cols = std::min(g.n, n_begin + kBlockCols) - n_begin;
      T* block_out = out + first * g.out_stride + n_begin;
      if (broadcast_weights) {
        // Tile rows: 6 output columns (weight rows); tile columns: 16 tokens.
        if (!weights_in_place) pack_weight_blocks<T>(g, e, n_begin, cols, 0, g.depth, kTileRows6, wp.data());
        for (std::int64_t c0 = 0; c0 < cols; c0 += kTileRows6) {
          const std::int64_t nc = std::min<std::int64_t>(kTileRows6, cols - c0);
          const float* w = weights_in_place ? static_cast<const float*>(g.w) + e * g.se + (n_begin + c0) * g.sn
                                            : wp.data() + c0 * g.depth;
          const std::int64_t rs = weights_in_place ? g.sn : 1, ks = weights_in_place ? 1 : kTileRows6;
          for (std::int64_t r0 = 0; r0 < count; r0 += kTileCols16) {
            const int width = block_width(r0, count);
            tile_for(width, w, rs, nc, ks, xp.data() + r0 * g.depth, width, g.depth, false, acc);
            store_tile<T>(acc, block_out + r0 * g.out_stride + c0, 1, g.out_stride, nc,
                          std::min<std::int64_t>(kTileCols16, count - r0));
          }
        }
        continue;
      }
      // Tile rows: 6 tokens; tile columns: 16 output columns. Depth in chunks of kDepthChunk: the
      // item's weight columns are packed per chunk (reading kBlockCols contiguous values of each
      // weight row) and the partial sums of its tiles accumulate in block_acc.
      for (std::int64_t k0 = 0; k0 < std::max<std::int64_t>(g.depth, 1); k0 += kDepthChunk) {  // once if depth 0
        const std::int64_t kc = std::min(kDepthChunk, g.depth - k0);
        pack_weight_blocks<T>(g, e, n_begin, cols, k0, kc, kTileCols16, wp.data());
        for (std::int64_t c0 = 0; c0 < cols; c0 += kTileCols16) {
          const int width = block_width(c0, cols);
          for (std::int64_t r0 = 0; r0 < count; r0 += kTileRows6) {
            tile_for(width, xp.data() + r0 * g.depth + k0 * kTileRows6, 1, kTileRows6, kTileRows6, wp.data() + c0 * kc,
                     width, kc, k0 > 0, block_acc.data() + (c0 * packed_rows + r0 * kTileCols16));
          }
        }
      }
      for (std::int64_t c0 = 0; c0 < cols; c0 += kTileCols16) {
        for (std::int64_t r0 = 0; r0 < count; r0 += kTileRows6) {
          store_tile<T>(block_acc.data() + (c0 * packed_rows + r0 * kTileCols16), block_out + r0 * g.out_stride + c0,
                        g.out_stride, 1, std::min<std::int64_t>(kTileRows6, count - r0),
                        std::min<std::int64_t>(kTileCols16, cols - c0));
        }
      }
    }
  }
}

}  // namespace
#endif

void moe_expert_gemm(int dtype, const void* a, std::int64_t a_stride, const std::int64_t* assignment_of_row, int k,
                     const void* w, std::int64_t w_expert_stride, std::int64_t w_n_stride, std::int64_t w_k_stride,
                     std::int64_t n, std::int64_t depth, const std::int64_t* counts, const std::int64_t* offsets,
                     std::int64_t experts, std::int64_t rows, void* out, std::int64_t out_stride) {
  if (!has_avx2()) throw std::runtime_error("moe_expert_gemm: this CPU lacks AVX2 + FMA (check moe_expert_gemm_available)");
  if (dtype == kFloat64) throw std::invalid_argument("moe_expert_gemm: float64 is not supported (torch computes it)");
#ifdef PYFAST_X86
  const GroupedGemm g{a, a_stride, assignment_of_row, k, w, w_expert_stride, w_n_stride, w_k_stride,
                      n, depth, counts, offsets, out, out_stride};
  dispatch_float(dtype, "moe_expert_gemm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) grouped_gemm<T>(g, experts, rows);
  });
#endif
}

}  // namespace pyfast::cpu
