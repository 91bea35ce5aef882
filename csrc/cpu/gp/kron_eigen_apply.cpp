// Kronecker products in the eigenbasis of a grid, in one buffer:
//   out = Q diag(L^power) Q^T x,   Q = Q_1 (x) ... (x) Q_D,   L = noise + lam_1 (x) ... (x) lam_D,
// or either half: diag(L^power) Q^T x, or Q x (any square Kronecker product: kron_mv). Each mode
// product multiplies along one axis of the row-major grid viewed as (A, n_d, C): A GEMMs
// Q_d @ x[a] (n_d x C), or, when C = 1, the single GEMM x (A, n_d) @ Q_d^T. Passes:
// - leading modes (all but the trailing F): one pass each over the grid, in place in `out`, work
//   items of (a, column block) packed into per-thread scratch first (the first pass reads x);
// - the trailing F modes, whose slices fit in L2 (kBlockBytes): per block of slices, Q^T along
//   each trailing mode, the scaling by L^power and Q along them again, all in per-thread scratch.
// So a 64^3 solve reads and writes the grid three times (torch's mode products: seven times, plus
// the scaling) and allocates nothing grid-sized besides `out`. The GEMMs run on the register tile
// of common/gemm_tile.h.
#include <algorithm>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/gemm_tile.h"
#include "common/parallel.h"
#include "cpu/gp/gp.h"
#include "cpu/gp/spectrum.h"

namespace pyfast::cpu {

bool gp_kron_eigen_apply_available() { return has_avx2(); }

#ifdef PYFAST_X86
namespace {

constexpr std::int64_t kBlockBytes = 256 * 1024;  // trailing-mode blocks: in L2
constexpr std::int64_t kTinyBytes = 32 * 1024;    // grids this small run as one block
constexpr std::int64_t kPanelBytes = 256 * 1024;  // leading-mode column blocks (n_d x width): in L2
constexpr std::int64_t kDepth = 256;              // GEMM depth chunk
constexpr std::int64_t kRowBlock = 96;            // GEMM rows of a per block (a multiple of 6)

// The right operand of `gemm`: row-major (k x n) with row stride ld, or packed by `pack_panels`.
template <typename T>
struct Operand {
  const T* data;
  std::int64_t ld;  // 0: packed
};

// b (k x n, row stride ldb) as column panels of kTileCols<T>, each [k][kTileCols<T>] and
// zero-padded, panel j at dst + j * k * kTileCols<T>: unit-stride loads for the tile.
template <typename T>
void pack_panels(std::int64_t k, std::int64_t n, const T* b, std::int64_t ldb, T* dst) {
  constexpr int W = kTileCols<T>;
  for (std::int64_t j0 = 0; j0 < n; j0 += W, dst += k * W) {
    const std::int64_t width = std::min<std::int64_t>(W, n - j0);
    for (std::int64_t kk = 0; kk < k; ++kk) {
      const T* src = b + kk * ldb + j0;
      T* row = dst + kk * W;
      std::copy(src, src + width, row);
      std::fill(row + width, row + W, T(0));
    }
  }
}

// c (m x n) = a (m x k) @ b (k x n); a, c row-major with row strides lda, ldc; c overlaps neither.
// Blocked for large factors: per depth chunk (kDepth) and block of kRowBlock rows of a (kept in
// L2), every column panel of b (kept in L1) meets every 6-row tile. tail: kDepth * kTileCols<T>
// values of scratch for a last partial column panel of an unpacked b.
template <typename T>
PYFAST_AVX2 void gemm(std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda, Operand<T> b,
                      T* c, std::int64_t ldc, T* tail) {
  constexpr int W = kTileCols<T>;
  alignas(32) T acc[kTileRows * W];
  for (std::int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const std::int64_t depth = std::min(kDepth, k - k0);
    const bool first = k0 == 0;
    for (std::int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const std::int64_t r1 = std::min(m, r0 + kRowBlock);
      for (std::int64_t j0 = 0; j0 < n; j0 += W) {
        const std::int64_t width = std::min<std::int64_t>(W, n - j0);
        const T* panel = b.ld ? b.data + k0 * b.ld + j0 : b.data + j0 * k + k0 * W;
        std::int64_t panel_stride = b.ld ? b.ld : W;
        if (width < W && b.ld) {
          pack_panels(depth, width, panel, b.ld, tail);
          panel = tail;
          panel_stride = W;
        }
        for (std::int64_t i0 = r0; i0 < r1; i0 += kTileRows) {
          const std::int64_t rows = std::min<std::int64_t>(kTileRows, r1 - i0);
          gemm_tile<T, 2>(a + i0 * lda + k0, lda, rows, 1, panel, panel_stride, depth, false, acc);
          for (std::int64_t i = 0; i < rows; ++i) {
            T* row = c + (i0 + i) * ldc + j0;
            const T* sum = acc + i * W;
            if (first) {
              std::copy(sum, sum + width, row);
            } else {
              for (std::int64_t t = 0; t < width; ++t) row[t] += sum[t];
            }
          }
        }
      }
    }
  }
}

// dst = M along the middle axis of src (A, n, C), both contiguous and disjoint: for C = 1 the rows
// (A, n) times M^T, given packed (`pack_panels`: measured 10-20% faster there), else M @ src[a]
// for each a (src[a] in place: packing per product cost more than it saved at n = C = 64).
template <typename T>
void mode_product(const T* m, const T* mt_packed, const T* src, T* dst, std::int64_t A, std::int64_t n, std::int64_t C,
                  T* tail) {
  if (C == 1) return gemm(A, n, n, src, n, Operand<T>{mt_packed, 0}, dst, n, tail);
  for (std::int64_t a = 0; a < A; ++a) gemm(n, C, n, m, n, Operand<T>{src + a * n * C, C}, dst + a * n * C, C, tail);
}

inline std::int64_t round_up(std::int64_t v, std::int64_t step) { return (v + step - 1) / step * step; }

// Per-thread scratch that persists across calls (grows only, to the largest block, panel or packed
// factor seen), so no call faults fresh pages in: kilobytes at 64^3; at 1024^2 the calling thread
// keeps 8 MB per direction of packed last factor (unpacked, a 1024^2 kron_mv ran 20% slower).
template <typename T>
T* scratch(int slot, std::int64_t size) {
  static thread_local std::vector<T> buffers[4];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<std::int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

template <typename T>
struct EigenApply {
  const T* x;
  T* out;
  std::int64_t cols;
  int D;
  const std::int64_t* sizes;
  const T* const* q;   // Q_d, row-major
  const T* const* qt;  // Q_d^T, row-major
  bool rotate_in, rotate_out;
  const SpectrumScaler* scaler;  // null: no scaling

  std::int64_t prod(int begin, int end) const {
    std::int64_t p = 1;
    for (int d = begin; d < end; ++d) p *= sizes[d];
    return p;
  }

  // Trailing modes per block: as many as fit kBlockBytes (at least one) while four slices per
  // thread remain (a 256^2 float32 grid in one slice ran on one thread), unless the whole grid
  // is tiny.
  int trailing_modes() const {
    const std::int64_t bytes = cols * static_cast<std::int64_t>(sizeof(T));
    const bool tiny = prod(0, D) * bytes <= kTinyBytes;
    int F = 1;
    while (F < D && prod(D - F - 1, D) * bytes <= kBlockBytes && (tiny || prod(0, D - F - 1) >= 4 * max_threads())) ++F;
    return F;
  }

  // One leading mode d (< D - F): out = M along mode d of src (src == out: in place). Items are
  // column blocks of one a, packed (copied) first.
  void leading_pass(int d, const T* m, const T* src) const {
    constexpr std::int64_t W = kTileCols<T>;
    const std::int64_t A = prod(0, d), n = sizes[d], C = prod(d + 1, D) * cols;
    // Columns per item: a panel that fits kPanelBytes, narrowed to give every thread four items.
    const std::int64_t fit = kPanelBytes / (n * static_cast<std::int64_t>(sizeof(T)));
    const std::int64_t share = C / ((4 * max_threads() + A - 1) / A);
    const std::int64_t width = std::min(C, std::max(W, std::min(fit, share) / W * W));
    const std::int64_t per_a = (C + width - 1) / width;
    parallel_for(A * per_a, 1, [&](std::int64_t i0, std::int64_t i1) {
      T* tail = scratch<T>(0, kDepth * W);
      T* panels = scratch<T>(1, n * round_up(width, W));
      for (std::int64_t item = i0; item < i1; ++item) {
        const std::int64_t a = item / per_a, c0 = item % per_a * width, w = std::min(width, C - c0);
        pack_panels(n, w, src + a * n * C + c0, C, panels);
        gemm(n, w, n, m, n, Operand<T>{panels, 0}, out + a * n * C + c0, C, tail);
      }
    });
  }

  // The trailing F modes, scaling included, per block of `group` slices.
  void trailing_pass(int F, const T* src) const {
    const int first = D - F;
    const std::int64_t slices = prod(0, first), slice = prod(first, D) * cols;
    const std::int64_t fit = std::max<std::int64_t>(1, kBlockBytes / (slice * static_cast<std::int64_t>(sizeof(T))));
    const std::int64_t balanced = std::max<std::int64_t>(1, slices / (4 * max_threads()));
    const std::int64_t group = std::min(fit, balanced);
    const std::int64_t blocks = (slices + group - 1) / group;
    const std::int64_t row_values = sizes[D - 1] * cols;  // one row of the scaler's (N / n_D, n_D) view
    // Products with C = 1 (the last mode for one column, and any mode followed only by size-1
    // modes) multiply rows by M^T: Q_d (in) and Q_d^T (out), packed once into the calling
    // thread's scratch.
    std::vector<std::int64_t> at(D, -1);  // offset of mode d's packed matrices
    std::int64_t packed = 0;
    for (int d = first; d < D; ++d) {
      if (prod(d + 1, D) * cols == 1) at[d] = packed, packed += sizes[d] * round_up(sizes[d], kTileCols<T>);
    }
    T* packed_in = rotate_in ? scratch<T>(2, packed) : nullptr;
    T* packed_out = rotate_out ? scratch<T>(3, packed) : nullptr;
    for (int d = first; d < D; ++d) {
      if (at[d] < 0) continue;
      if (packed_in) pack_panels(sizes[d], sizes[d], q[d], sizes[d], packed_in + at[d]);
      if (packed_out) pack_panels(sizes[d], sizes[d], qt[d], sizes[d], packed_out + at[d]);
    }
    parallel_for(blocks, 1, [&](std::int64_t b0, std::int64_t b1) {
      T* tail = scratch<T>(0, kDepth * kTileCols<T>);
      T* buffers[2] = {scratch<T>(1, 2 * group * slice), nullptr};
      buffers[1] = buffers[0] + group * slice;
      for (std::int64_t block = b0; block < b1; ++block) {
        const std::int64_t s0 = block * group, count = std::min(group, slices - s0);
        T* dst = out + s0 * slice;
        const T* cur = src + s0 * slice;
        T* writable = nullptr;  // cur, once it is a buffer this block may overwrite
        int free_buffer = 0;
        const auto step = [&](int d, const T* m, const T* mt_packed, bool last) {
          T* target = last && cur != dst ? dst : buffers[free_buffer];
          if (target == buffers[free_buffer]) free_buffer ^= 1;
          mode_product(m, mt_packed, cur, target, count * prod(first, d), sizes[d], prod(d + 1, D) * cols, tail);
          cur = writable = target;
        };
        if (rotate_in) {
          for (int d = first; d < D; ++d) step(d, qt[d], packed_in + std::max<std::int64_t>(at[d], 0), !rotate_out && d == D - 1);
          if (scaler) scaler->scale(writable, s0 * slice / row_values, count * slice / row_values, cols);
        }
        if (rotate_out) {
          for (int d = D - 1; d >= first; --d) step(d, q[d], packed_out + std::max<std::int64_t>(at[d], 0), d == first);
        }
        if (cur != dst) std::copy(cur, cur + count * slice, dst);  // the last product ran in place
      }
    });
  }

  void run() const {
    const int F = trailing_modes();
    const T* src = x;
    if (rotate_in) {
      for (int d = 0; d < D - F; ++d) leading_pass(d, qt[d], src), src = out;
    }
    trailing_pass(F, src);
    if (rotate_out) {
      for (int d = D - F - 1; d >= 0; --d) leading_pass(d, q[d], out);
    }
  }
};

}  // namespace
#endif

void gp_kron_eigen_apply(int dtype, const void* x, void* out, std::int64_t cols, const void* const* q,
                         const void* const* qt, const std::int64_t* sizes, int D, bool rotate_in, bool rotate_out,
                         const KronSpectrum* spectrum, double power) {
  if (!has_avx2()) throw std::runtime_error("gp_kron_eigen_apply: this CPU lacks AVX2 + FMA");
  if (D < 1 || !(rotate_in || rotate_out)) throw std::invalid_argument("gp_kron_eigen_apply: nothing to apply");
  if (spectrum != nullptr && !rotate_in) throw std::invalid_argument("gp_kron_eigen_apply: scaling needs rotate_in");
  for (int d = 0; d < D; ++d)
    if (sizes[d] < 1) throw std::invalid_argument("gp_kron_eigen_apply: every grid size must be >= 1");
  if (cols == 0) return;
#ifdef PYFAST_X86
  std::optional<SpectrumScaler> scaler;
  if (spectrum != nullptr) scaler.emplace(*spectrum, power);
  dispatch_float(dtype, "gp_kron_eigen_apply", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const EigenApply<T> plan{static_cast<const T*>(x), static_cast<T*>(out), cols, D, sizes,
                               reinterpret_cast<const T* const*>(q), reinterpret_cast<const T* const*>(qt),
                               rotate_in, rotate_out, scaler ? &*scaler : nullptr};
      plan.run();
    } else {
      throw std::invalid_argument("gp_kron_eigen_apply: x must be float32 or float64");
    }
  });
#endif
}

}  // namespace pyfast::cpu
