// Grouped expert GEMM (reference.grouped_mm and the two GEMMs of reference.moe_mlp): for each
// expert e and each row r of its segment [offsets[e], offsets[e] + counts[e]),
//   out[r][n] = sum_k A_r[k] * W_e(n, k),   W_e(n, k) = w[e * se + n * sn + k * sk],
// with A_r = a[r], or the token row x[assignment_of_row[r] / k] (zero for assignment < 0) when the
// gather is fused. Rows outside every segment are zeroed.
//
// Blocking (BLIS-style, float32 compute): a tile is 6 weight rows x 16 token rows held in 12
// AVX2 accumulators. Per k, two 8-lane loads of the packed tokens Xp[k][0..16) and six broadcasts
// of W_e(n + i, k) feed 12 FMAs, so the loop runs at the FMA rate. Each thread packs the rows of
// an expert once (k-major panels of 16 rows, converted to float32, zero-padded) and reuses them for
// every block of n it takes of that expert; a last panel of at most 8 rows runs a 6 x 8 tile.
// float32 weights with unit k-stride are read in place; other weights (16-bit, transposed) are
// packed per work item into strips Wp[k][6].
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/half.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "cpu/moe/moe.h"

namespace pyfast::cpu {

bool moe_expert_gemm_available() { return has_avx2(); }

#ifdef PYFAST_X86
namespace {

constexpr int kTileRows = 16;  // token rows per tile: two 8-lane vectors
constexpr int kTileCols = 6;   // weight rows (output columns) per tile: broadcasts
// Output columns per work item: enough items for dynamic scheduling to balance a few large
// experts, few enough that the packed rows are reused many times.
constexpr std::int64_t kBlockCols = 16 * kTileCols;

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

// acc[i][t] = sum_k W(i, k) * Xp[k][t] for t < 8 * Vecs and i < 6, with W(i, k) = w[i * rs + k * ks]
// for i < cols; rows past `cols` repeat the last valid one (computed, never stored). Vecs = 2 is the
// main tile (Xp[k][16]); Vecs = 1 (Xp[k][8]) halves the padding of a segment's last rows.
template <int Vecs>
PYFAST_AVX2 void tile(const float* w, std::int64_t rs, std::int64_t cols, std::int64_t ks, const float* xp,
                      std::int64_t depth, float* acc) {
  static_assert(Vecs == 1 || Vecs == 2);
  // Named accumulators: an array of __m256 makes GCC keep them in memory across iterations.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const auto row = [&](std::int64_t i) { return w + std::min(i, cols - 1) * rs; };
  const float *w0 = row(0), *w1 = row(1), *w2 = row(2), *w3 = row(3), *w4 = row(4), *w5 = row(5);
  std::int64_t at = 0;
  for (std::int64_t kk = 0; kk < depth; ++kk, at += ks, xp += 8 * Vecs) {
    const __m256 b0 = _mm256_loadu_ps(xp), b1 = Vecs == 2 ? _mm256_loadu_ps(xp + 8) : b0;
    __m256 v = _mm256_broadcast_ss(w0 + at);
    c00 = _mm256_fmadd_ps(v, b0, c00);
    if constexpr (Vecs == 2) c01 = _mm256_fmadd_ps(v, b1, c01);
    v = _mm256_broadcast_ss(w1 + at);
    c10 = _mm256_fmadd_ps(v, b0, c10);
    if constexpr (Vecs == 2) c11 = _mm256_fmadd_ps(v, b1, c11);
    v = _mm256_broadcast_ss(w2 + at);
    c20 = _mm256_fmadd_ps(v, b0, c20);
    if constexpr (Vecs == 2) c21 = _mm256_fmadd_ps(v, b1, c21);
    v = _mm256_broadcast_ss(w3 + at);
    c30 = _mm256_fmadd_ps(v, b0, c30);
    if constexpr (Vecs == 2) c31 = _mm256_fmadd_ps(v, b1, c31);
    v = _mm256_broadcast_ss(w4 + at);
    c40 = _mm256_fmadd_ps(v, b0, c40);
    if constexpr (Vecs == 2) c41 = _mm256_fmadd_ps(v, b1, c41);
    v = _mm256_broadcast_ss(w5 + at);
    c50 = _mm256_fmadd_ps(v, b0, c50);
    if constexpr (Vecs == 2) c51 = _mm256_fmadd_ps(v, b1, c51);
  }
  _mm256_storeu_ps(acc + 0, c00), _mm256_storeu_ps(acc + 8, c01);
  _mm256_storeu_ps(acc + 16, c10), _mm256_storeu_ps(acc + 24, c11);
  _mm256_storeu_ps(acc + 32, c20), _mm256_storeu_ps(acc + 40, c21);
  _mm256_storeu_ps(acc + 48, c30), _mm256_storeu_ps(acc + 56, c31);
  _mm256_storeu_ps(acc + 64, c40), _mm256_storeu_ps(acc + 72, c41);
  _mm256_storeu_ps(acc + 80, c50), _mm256_storeu_ps(acc + 88, c51);
}

// Source row of output row r, or null for a padding row (zero input).
template <typename T>
const T* row_source(const GroupedGemm& g, std::int64_t r) {
  const T* a = static_cast<const T*>(g.a);
  if (g.assignment_of_row == nullptr) return a + r * g.a_stride;
  const std::int64_t assignment = g.assignment_of_row[r];
  return assignment < 0 ? nullptr : a + (assignment / g.k) * g.a_stride;
}

// Width of the row panel starting at row r0 of a segment of `count` rows: 16, or 8 for a last
// panel of at most 8 rows.
inline int panel_width(std::int64_t r0, std::int64_t count) { return count - r0 <= 8 ? 8 : kTileRows; }

// Rows [first, first + count) as float32 panels xp[p][k][width] (p-th panel at p * depth * 16),
// zero-padded to the panel width.
template <typename T>
void pack_rows(const GroupedGemm& g, std::int64_t first, std::int64_t count, float* xp) {
  for (std::int64_t r0 = 0; r0 < count; r0 += kTileRows, xp += g.depth * kTileRows) {
    const int width = panel_width(r0, count);
    for (int t = 0; t < width; ++t) {
      const T* src = r0 + t < count ? row_source<T>(g, first + r0 + t) : nullptr;
      float* dst = xp + t;
      if (src == nullptr) {
        for (std::int64_t kk = 0; kk < g.depth; ++kk) dst[kk * width] = 0.0f;
      } else {
        for (std::int64_t kk = 0; kk < g.depth; ++kk) dst[kk * width] = to_acc(src[kk]);
      }
    }
  }
}

// Weight rows [n0, n0 + cols) of expert e as float32 strips wp[s][k][6] (rows n0 + 6 s + i), the
// last strip zero-padded. k outer: a transposed weight (unit n-stride) is read along its rows.
template <typename T>
void pack_weights(const GroupedGemm& g, std::int64_t e, std::int64_t n0, std::int64_t cols, float* wp) {
  const T* w = static_cast<const T*>(g.w) + e * g.se + n0 * g.sn;
  const std::int64_t strips = (cols + kTileCols - 1) / kTileCols;
  for (std::int64_t kk = 0; kk < g.depth; ++kk) {
    const T* src = w + kk * g.sk;
    for (std::int64_t s = 0; s < strips; ++s) {
      float* dst = wp + (s * g.depth + kk) * kTileCols;
      for (int i = 0; i < kTileCols; ++i) {
        const std::int64_t j = s * kTileCols + i;
        dst[i] = j < cols ? to_acc(src[j * g.sn]) : 0.0f;
      }
    }
  }
}

// out[t][i] = acc[i][t] for the tile's valid rows and columns.
template <typename T>
void store_tile(const float* acc, T* out, std::int64_t stride, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t t = 0; t < rows; ++t) {
    for (std::int64_t i = 0; i < cols; ++i) out[t * stride + i] = from_acc<T>(acc[i * kTileRows + t]);
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
  // float32 weights with contiguous k are broadcast in place; anything else is packed per tile.
  const bool in_place = std::is_same_v<T, float> && g.sk == 1;
  const std::int64_t blocks = (g.n + kBlockCols - 1) / kBlockCols;
  std::vector<std::int64_t> item_expert;  // work item i: expert item_expert[i], block i - first[e]
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
  const std::int64_t panel_floats = g.depth * kTileRows;
  const std::int64_t packed_floats = (max_count + kTileRows - 1) / kTileRows * panel_floats;
  T* out = static_cast<T*>(g.out);

PYFAST_OMP(omp parallel if (items > 1))
  {
    std::vector<float> xp(static_cast<std::size_t>(packed_floats));
    std::vector<float> wp(in_place ? 0 : static_cast<std::size_t>(g.depth * kBlockCols));
    alignas(32) float acc[kTileCols * kTileRows];
    std::int64_t packed_expert = -1;
PYFAST_OMP(omp for schedule(dynamic, 1))
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t e = item_expert[item];
      const std::int64_t first = g.offsets[e], count = g.counts[e];
      if (e != packed_expert) {
        pack_rows<T>(g, first, count, xp.data());
        packed_expert = e;
      }
      const std::int64_t n_begin = (item - first_item[e]) * kBlockCols;
      const std::int64_t n_end = std::min(g.n, n_begin + kBlockCols);
      if (!in_place) pack_weights<T>(g, e, n_begin, n_end - n_begin, wp.data());
      for (std::int64_t n0 = n_begin; n0 < n_end; n0 += kTileCols) {
        const std::int64_t cols = std::min<std::int64_t>(kTileCols, n_end - n0);
        const float* w = in_place ? static_cast<const float*>(g.w) + e * g.se + n0 * g.sn
                                  : wp.data() + (n0 - n_begin) * g.depth;
        const std::int64_t rs = in_place ? g.sn : 1, ks = in_place ? 1 : kTileCols;
        for (std::int64_t r0 = 0; r0 < count; r0 += kTileRows) {
          const float* panel = xp.data() + r0 / kTileRows * panel_floats;
          if (panel_width(r0, count) == kTileRows) {
            tile<2>(w, rs, cols, ks, panel, g.depth, acc);
          } else {
            tile<1>(w, rs, cols, ks, panel, g.depth, acc);
          }
          store_tile<T>(acc, out + (first + r0) * g.out_stride + n0, g.out_stride,
                        std::min<std::int64_t>(kTileRows, count - r0), cols);
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
