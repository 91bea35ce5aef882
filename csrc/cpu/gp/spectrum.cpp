// Eigenbasis scaling and log-determinant of K_1 (x) ... (x) K_D + noise I without materializing the
// N eigenvalues L = noise + lam_1 (x) ... (x) lam_D: the leading D - 1 modes give one product per
// row of the (N / n_D, n_D) view, and the last mode's eigenvalues are swept along the row.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/gp/gp.h"

namespace pyfast::cpu {
namespace {

// prod_{d < D-1} lam_d[i_d] for every index of the leading modes (row-major), left to right; {1}
// for D = 1 (multiplying by 1 is exact).
std::vector<double> leading_products(const KronSpectrum& s) {
  std::vector<double> out{1.0};
  for (int d = 0; d + 1 < s.D; ++d) {
    std::vector<double> next;
    next.reserve(out.size() * s.sizes[d]);
    for (double p : out)
      for (std::int64_t i = 0; i < s.sizes[d]; ++i) next.push_back(p * s.lams[d][i]);
    out.swap(next);
  }
  return out;
}

template <typename T>
void scale_rows(T* z, std::int64_t cols, const KronSpectrum& s, double power) {
  const std::vector<double> lead = leading_products(s);
  const double* last = s.lams[s.D - 1];
  const std::int64_t n = s.sizes[s.D - 1];
  const bool root = power == -0.5;
  parallel_for(static_cast<std::int64_t>(lead.size()), 1, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      T* row = z + r * n * cols;
      for (std::int64_t j = 0; j < n; ++j) {
        const double L = lead[r] * last[j] + s.noise;
        const T scale = static_cast<T>(root ? 1.0 / std::sqrt(L) : 1.0 / L);
        for (std::int64_t b = 0; b < cols; ++b) row[j * cols + b] *= scale;
      }
    }
  });
}

// Largest |log2 L| over the grid: L is multilinear in the factor eigenvalues, so its extremes lie
// at products of per-factor extremes (2^D candidates).
double max_abs_log2(const KronSpectrum& s) {
  std::vector<double> candidates{1.0};
  for (int d = 0; d < s.D; ++d) {
    double lo = s.lams[d][0], hi = s.lams[d][0];
    for (std::int64_t i = 1; i < s.sizes[d]; ++i) {
      lo = std::min(lo, s.lams[d][i]);
      hi = std::max(hi, s.lams[d][i]);
    }
    std::vector<double> next;
    for (double c : candidates) {
      next.push_back(c * lo);
      next.push_back(c * hi);
    }
    candidates.swap(next);
  }
  double worst = 1.0;
  for (double c : candidates) worst = std::max(worst, std::fabs(std::log2(std::fabs(c + s.noise))));
  return worst;
}

}  // namespace

void gp_scale_by_spectrum(int dtype, void* z, std::int64_t cols, const KronSpectrum& spectrum, double power) {
  if (power != -1.0 && power != -0.5) throw std::invalid_argument("gp_scale_by_spectrum: power must be -1 or -0.5");
  if (dtype == kFloat32) return scale_rows(static_cast<float*>(z), cols, spectrum, power);
  if (dtype == kFloat64) return scale_rows(static_cast<double*>(z), cols, spectrum, power);
  throw std::invalid_argument("gp_scale_by_spectrum: z must be float32 or float64");
}

// sum log L without a log per element: products of `block` consecutive L (|log2| of each at most
// `max_abs_log2`, so a block stays inside the float64 exponent range) are renormalized by frexp,
// and one log per row adds the mantissas; 4 independent products keep the multiplier busy.
// Eigenvalues beyond 2^+-480 (never met by a sane kernel) take one log each.
double gp_log_spectrum_sum(const KronSpectrum& s) {
  const std::vector<double> lead = leading_products(s);
  const double* last = s.lams[s.D - 1];
  const std::int64_t n = s.sizes[s.D - 1];
  const int block = static_cast<int>(std::min(960.0 / max_abs_log2(s), 8.0));
  const std::int64_t rows = static_cast<std::int64_t>(lead.size());
  std::vector<double> row_sums(rows);
  parallel_for(rows, 1, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const double p = lead[r];
      double m[4] = {1.0, 1.0, 1.0, 1.0};
      std::int64_t exponent = 0;
      int since = 0;
      std::int64_t j = 0;
      for (; block >= 2 && j + 4 <= n; j += 4) {
        for (int q = 0; q < 4; ++q) m[q] *= p * last[j + q] + s.noise;
        if (++since == block) {
          for (double& v : m) {
            int e;
            v = std::frexp(v, &e);
            exponent += e;
          }
          since = 0;
        }
      }
      double sum = 0.0;
      for (; j < n; ++j) sum += std::log(p * last[j] + s.noise);
      for (double v : m) sum += std::log(v);
      row_sums[r] = sum + static_cast<double>(exponent) * M_LN2;
    }
  });
  double total = 0.0;
  for (double v : row_sums) total += v;
  return total;
}

}  // namespace pyfast::cpu
