// Row movement between token order and the expert-grouped layout (reference.gather_rows /
// reference.unpermute), and the gate-weight gradient of the combine.
//   gather:  out[r] = scale[a] * x[a / k]            a = assignment_of_row[r], zero row when a < 0
//   combine: out[t] = sum_j w[t, j] * y[row(t, j)]    skipping row(t, j) < 0
#include <algorithm>
#include <cstring>

#include "common/half.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "cpu/moe/moe.h"

namespace pyfast::cpu {
namespace {

// Rows are long (d in the thousands): a few hundred rows per thread amortize the fork.
constexpr std::int64_t kRowGrain = 64;
// Combine accumulates a tile of the row in the accumulation type, sized to stay in L1.
constexpr std::int64_t kTile = 1024;
// Dot products keep this many independent partial sums (vector lanes), added in a fixed order.
constexpr int kLanes = 16;

// sum_i a[i] * b[i] in the accumulation type; the lane split makes the loop vectorize while
// the summation order stays fixed (deterministic, independent of threads).
template <typename T>
inline acc_t<T> dot(const T* __restrict a, const T* __restrict b, std::int64_t n) {
  using A = acc_t<T>;
  A lanes[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += to_acc(a[i + l]) * to_acc(b[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += to_acc(a[i]) * to_acc(b[i]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

template <typename T>
void gather_rows(const T* x, std::int64_t d, std::int64_t stride, const std::int64_t* assignment_of_row,
                 std::int64_t rows, int k, const acc_t<T>* scale, T* out) {
  advise_huge_pages(out, static_cast<std::size_t>(rows * d) * sizeof(T));
  parallel_for(rows, kRowGrain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      T* __restrict dst = out + r * d;
      const std::int64_t a = assignment_of_row[r];
      if (a < 0) {
        std::memset(static_cast<void*>(dst), 0, sizeof(T) * d);
        continue;
      }
      const T* __restrict src = x + (a / k) * stride;
      if (scale == nullptr) {
        std::memcpy(static_cast<void*>(dst), src, sizeof(T) * d);
        continue;
      }
      const acc_t<T> s = scale[a];
      for (std::int64_t i = 0; i < d; ++i) dst[i] = from_acc<T>(s * to_acc(src[i]));
    }
  });
}

template <typename T>
void combine_rows(const T* y, std::int64_t d, std::int64_t stride, const std::int64_t* row_of_assignment,
                  std::int64_t tokens, int k, const acc_t<T>* weights, T* out) {
  using A = acc_t<T>;
  advise_huge_pages(out, static_cast<std::size_t>(tokens * d) * sizeof(T));
  parallel_for(tokens, kRowGrain, [&](std::int64_t begin, std::int64_t end) {
    A acc[kTile];
    for (std::int64_t t = begin; t < end; ++t) {
      const std::int64_t* rows = row_of_assignment + t * k;
      for (std::int64_t i0 = 0; i0 < d; i0 += kTile) {
        const std::int64_t n = std::min(kTile, d - i0);
        std::fill(acc, acc + n, A(0));
        for (int j = 0; j < k; ++j) {
          if (rows[j] < 0) continue;
          const A w = weights == nullptr ? A(1) : weights[t * k + j];
          const T* __restrict src = y + rows[j] * stride + i0;
          for (std::int64_t i = 0; i < n; ++i) acc[i] += w * to_acc(src[i]);
        }
        T* __restrict dst = out + t * d + i0;
        for (std::int64_t i = 0; i < n; ++i) dst[i] = from_acc<T>(acc[i]);
      }
    }
  });
}

template <typename T>
void combine_weights_grad(const T* grad_out, std::int64_t grad_stride, const T* y, std::int64_t y_stride,
                          std::int64_t d, const std::int64_t* row_of_assignment, std::int64_t tokens, int k,
                          acc_t<T>* grad_weights) {
  using A = acc_t<T>;
  parallel_for(tokens, kRowGrain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      const T* __restrict g = grad_out + t * grad_stride;
      for (int j = 0; j < k; ++j) {
        const std::int64_t row = row_of_assignment[t * k + j];
        grad_weights[t * k + j] = row >= 0 ? dot(g, y + row * y_stride, d) : A(0);
      }
    }
  });
}

}  // namespace

void moe_gather_rows(int dtype, const void* x, std::int64_t d, std::int64_t stride,
                     const std::int64_t* assignment_of_row, std::int64_t rows, int k, const void* scale_acc,
                     void* out) {
  dispatch_float(dtype, "moe_gather_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gather_rows<T>(static_cast<const T*>(x), d, stride, assignment_of_row, rows, k,
                   static_cast<const acc_t<T>*>(scale_acc), static_cast<T*>(out));
  });
}

void moe_combine_rows(int dtype, const void* y, std::int64_t d, std::int64_t stride,
                      const std::int64_t* row_of_assignment, std::int64_t tokens, int k, const void* weights_acc,
                      void* out) {
  dispatch_float(dtype, "moe_combine_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    combine_rows<T>(static_cast<const T*>(y), d, stride, row_of_assignment, tokens, k,
                    static_cast<const acc_t<T>*>(weights_acc), static_cast<T*>(out));
  });
}

void moe_combine_weights_grad(int dtype, const void* grad_out, std::int64_t grad_stride, const void* y,
                              std::int64_t y_stride, std::int64_t d, const std::int64_t* row_of_assignment,
                              std::int64_t tokens, int k, void* grad_weights_acc) {
  dispatch_float(dtype, "moe_combine_weights_grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    combine_weights_grad<T>(static_cast<const T*>(grad_out), grad_stride, static_cast<const T*>(y), y_stride, d,
                            row_of_assignment, tokens, k, static_cast<acc_t<T>*>(grad_weights_acc));
  });
}

}  // namespace pyfast::cpu
