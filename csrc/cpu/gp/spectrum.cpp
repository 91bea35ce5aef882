// Eigenbasis scaling and log-determinant of K_1 (x) ... (x) K_D + noise I without materializing the
// N eigenvalues L = noise + lam_1 (x) ... (x) lam_D: the leading D - 1 modes give one product per
// row of the (N / n_D, n_D) view, and the last mode's eigenvalues are swept along the row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/gp/gp.h"
#include "cpu/gp/spectrum.h"

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

// One row of the (N / n_D, n_D) view: row[j, b] *= (p * last[j] + noise)^power. Inlined into
// run_widest (AVX2 vectorizes the division 4 wide); `scale` is n doubles of scratch.
template <typename T>
[[gnu::always_inline]] inline void scale_row(T* row, std::int64_t cols, double p, const double* last, std::int64_t n,
                                                  double noise, bool root, double* scale) {
  for (std::int64_t j = 0; j < n; ++j) scale[j] = p * last[j] + noise;
  if (root) {
    for (std::int64_t j = 0; j < n; ++j) scale[j] = 1.0 / std::sqrt(scale[j]);
  } else {
    for (std::int64_t j = 0; j < n; ++j) scale[j] = 1.0 / scale[j];
  }
  if (cols == 1) {
    for (std::int64_t j = 0; j < n; ++j) row[j] *= static_cast<T>(scale[j]);
  } else {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t b = 0; b < cols; ++b) row[j * cols + b] *= static_cast<T>(scale[j]);
  }
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

// v = m 2^e with m in [0.5, 1): sets v = m, returns e (frexp for a positive normal v, inline).
inline std::int64_t split_exponent(double& v) {
  std::uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const std::int64_t e = static_cast<std::int64_t>((bits >> 52) & 0x7ff) - 1022;
  bits = (bits & ~(std::uint64_t{0x7ff} << 52)) | (std::uint64_t{1022} << 52);
  std::memcpy(&v, &bits, sizeof(v));
  return e;
}

// log of a running product of positive factors: four interleaved products, each renormalized to
// [0.5, 1) (exponents summed apart) after every `block` pushes, and only four logs at the end.
class LogProduct {
 public:
  explicit LogProduct(int block) : block_(block) {}

  void push4(const double* v) {
    for (int q = 0; q < 4; ++q) m_[q] *= v[q];
    count();
  }
  void push1(double v) {
    m_[0] *= v;
    count();
  }
  double log() const {
    double sum = static_cast<double>(exponent_) * M_LN2;
    for (double v : m_) sum += std::log(v);
    return sum;
  }

 private:
  void count() {
    if (++since_ < block_) return;
    for (double& v : m_) exponent_ += split_exponent(v);
    since_ = 0;
  }
  double m_[4] = {1.0, 1.0, 1.0, 1.0};
  std::int64_t exponent_ = 0;
  int since_ = 0;
  int block_;
};

// sum log L over `rows` rows with leading products lead[0..rows) (L: n doubles of scratch).
// Inlined into run_widest.
[[gnu::always_inline]] inline double log_chunk(const double* lead, std::int64_t rows, const double* last,
                                                   std::int64_t n, double noise, int block, double* L) {
  LogProduct product(block);
  double direct = 0.0;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < n; ++j) L[j] = lead[r] * last[j] + noise;
    if (block < 2) {
      for (std::int64_t j = 0; j < n; ++j) direct += std::log(L[j]);
      continue;
    }
    std::int64_t j = 0;
    for (; j + 4 <= n; j += 4) product.push4(L + j);
    for (; j < n; ++j) product.push1(L[j]);
  }
  return direct + product.log();
}

}  // namespace

SpectrumScaler::SpectrumScaler(const KronSpectrum& s, double power)
    : lead_(leading_products(s)), last_(s.lams[s.D - 1]), n_(s.sizes[s.D - 1]), noise_(s.noise), root_(power == -0.5) {
  if (power != -1.0 && power != -0.5) throw std::invalid_argument("gp spectrum scaling: power must be -1 or -0.5");
}

template <typename T>
void SpectrumScaler::scale(T* z, std::int64_t first, std::int64_t count, std::int64_t cols) const {
  std::vector<double> scratch(n_);
  run_widest([&]() PYFAST_INLINE {
    for (std::int64_t r = 0; r < count; ++r)
      scale_row(z + r * n_ * cols, cols, lead_[first + r], last_, n_, noise_, root_, scratch.data());
  });
}

template void SpectrumScaler::scale<float>(float*, std::int64_t, std::int64_t, std::int64_t) const;
template void SpectrumScaler::scale<double>(double*, std::int64_t, std::int64_t, std::int64_t) const;

void gp_scale_by_spectrum(int dtype, void* z, std::int64_t cols, const KronSpectrum& spectrum, double power) {
  const SpectrumScaler scaler(spectrum, power);
  const std::int64_t row_values = scaler.row_points() * cols;
  dispatch_float(dtype, "gp_scale_by_spectrum", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      T* rows = static_cast<T*>(z);
      parallel_for(scaler.rows(), 1, [&](std::int64_t r0, std::int64_t r1) {
        scaler.scale(rows + r0 * row_values, r0, r1 - r0, cols);
      });
    } else {
      throw std::invalid_argument("gp_scale_by_spectrum: z must be float32 or float64");
    }
  });
}

// sum log L without a log per element: with |log2 L| <= max_abs_log2 (= W), a product of
// block = 960 / W factors times a mantissa stays inside the float64 exponent range. Fixed chunks
// of rows keep the sum independent of the thread count. Spectra beyond 2^+-480 (never met by a
// sane kernel) take one log per element.
double gp_log_spectrum_sum(const KronSpectrum& s) {
  const std::vector<double> lead = leading_products(s);
  const double* last = s.lams[s.D - 1];
  const std::int64_t n = s.sizes[s.D - 1];
  const int block = static_cast<int>(std::min(960.0 / max_abs_log2(s), 1024.0));
  const std::int64_t rows = static_cast<std::int64_t>(lead.size());
  constexpr std::int64_t kChunkRows = 64;
  std::vector<double> chunk_sums((rows + kChunkRows - 1) / kChunkRows);
  parallel_chunks(rows, kChunkRows, [&](std::int64_t c, std::int64_t r0, std::int64_t r1) {
    std::vector<double> L(n);
    run_widest([&]() PYFAST_INLINE { chunk_sums[c] = log_chunk(lead.data() + r0, r1 - r0, last, n, s.noise, block, L.data()); });
  });
  double total = 0.0;
  for (double v : chunk_sums) total += v;
  return total;
}

}  // namespace pyfast::cpu
