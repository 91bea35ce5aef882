// S4D Vandermonde kernel without the (H, N, L) tensor. Positions are split into blocks of
// kBlock: exp((l0 + j) w) = exp(l0 w) exp(j w). The table exp(j w), j < kBlock, is built once per
// channel h; the block anchors exp(l0 w) advance by one complex product per block and are
// recomputed exactly (exp, cos, sin) every kReanchor blocks. Tables and anchors are formed in
// double, so every term is the product of two values rounded once to the compute type, and the
// error does not grow with l. Per block the forward is a real (2N x kBlock) matrix-vector
// product, the backward its transpose. K and the incoming gradient may be stored in float16 /
// bfloat16 (S); the arithmetic then runs in float32 (T = acc_t<S>).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "common/half.h"
#include "common/parallel.h"
#include "cpu/ssm/ssm.h"

namespace pyfast::cpu {
namespace {

constexpr std::int64_t kBlock = 64;
constexpr std::int64_t kReanchor = 16;

struct Complex {
  double re, im;
};

inline Complex mul(Complex a, Complex b) { return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re}; }

// exp(t w) computed directly.
inline Complex exp_scaled(Complex w, double t) {
  const double r = std::exp(t * w.re);
  return {r * std::cos(t * w.im), r * std::sin(t * w.im)};
}

// Anchors exp(l0 w_n) for the blocks l0 = 0, kBlock, 2 kBlock, ... of one channel.
class Anchors {
 public:
  explicit Anchors(const std::vector<Complex>& w) : w_(w), step_(w.size()), value_(w.size()) {
    for (std::size_t n = 0; n < w.size(); ++n) {
      step_[n] = exp_scaled(w[n], static_cast<double>(kBlock));
      value_[n] = {1.0, 0.0};
    }
  }
  const Complex& operator[](std::size_t n) const { return value_[n]; }
  // Moves to block `block` (called with block = 1, 2, ... in order).
  void advance(std::int64_t block) {
    const bool exact = block % kReanchor == 0;
    for (std::size_t n = 0; n < w_.size(); ++n) {
      value_[n] = exact ? exp_scaled(w_[n], static_cast<double>(block * kBlock)) : mul(value_[n], step_[n]);
    }
  }

 private:
  const std::vector<Complex>& w_;
  std::vector<Complex> step_, value_;
};

template <typename T>
std::vector<Complex> load_w(const T* w, std::int64_t N) {
  std::vector<Complex> out(N);
  for (std::int64_t n = 0; n < N; ++n) out[n] = {static_cast<double>(w[2 * n]), static_cast<double>(w[2 * n + 1])};
  return out;
}

// exp(j w_n) for j < kBlock, by products in double from exp(w_n). Layout (re, im) planes of
// [n][j] (`by_n`) or [j][n].
template <typename T>
void power_table(const std::vector<Complex>& w, bool by_n, T* re, T* im) {
  const std::int64_t N = static_cast<std::int64_t>(w.size());
  for (std::int64_t n = 0; n < N; ++n) {
    const Complex z = exp_scaled(w[n], 1.0);
    Complex p{1.0, 0.0};
    for (std::int64_t j = 0; j < kBlock; ++j) {
      const std::int64_t at = by_n ? n * kBlock + j : j * N + n;
      re[at] = static_cast<T>(p.re);
      im[at] = static_cast<T>(p.im);
      p = (j % 16 == 15) ? exp_scaled(w[n], static_cast<double>(j + 1)) : mul(p, z);
    }
  }
}

template <typename S, typename T = acc_t<S>>
void vandermonde_fwd(const T* W, const T* w, std::int64_t channels, std::int64_t H, std::int64_t N, std::int64_t L,
                     S* K) {
  parallel_for(H, 1, [&](std::int64_t h_begin, std::int64_t h_end) {
    std::vector<T> table_re(N * kBlock), table_im(N * kBlock), a_re(N), a_im(N);
    T acc[kBlock];
    for (std::int64_t h = h_begin; h < h_end; ++h) {
      const std::vector<Complex> wh = load_w(w + 2 * h * N, N);
      power_table(wh, /*by_n=*/true, table_re.data(), table_im.data());
      for (std::int64_t c = 0; c < channels; ++c) {
        const T* Wc = W + 2 * (c * H + h) * N;
        S* out = K + (c * H + h) * L;
        Anchors anchors(wh);
        for (std::int64_t block = 0, l0 = 0; l0 < L; ++block, l0 += kBlock) {
          if (block > 0) anchors.advance(block);
          for (std::int64_t n = 0; n < N; ++n) {  // a = W exp(l0 w), doubled for the 2 Re(.)
            const Complex a = mul({static_cast<double>(Wc[2 * n]), static_cast<double>(Wc[2 * n + 1])}, anchors[n]);
            a_re[n] = static_cast<T>(2 * a.re);
            a_im[n] = static_cast<T>(-2 * a.im);
          }
          std::fill(acc, acc + kBlock, T(0));
          for (std::int64_t n = 0; n < N; ++n) {
            const T ar = a_re[n], ai = a_im[n];
            const T* er = table_re.data() + n * kBlock;
            const T* ei = table_im.data() + n * kBlock;
            for (std::int64_t j = 0; j < kBlock; ++j) acc[j] += ar * er[j] + ai * ei[j];
          }
          const std::int64_t len = std::min(kBlock, L - l0);
          for (std::int64_t j = 0; j < len; ++j) out[l0 + j] = from_acc<S>(acc[j]);
        }
      }
    }
  });
}

template <typename S, typename T = acc_t<S>>
void vandermonde_bwd(const S* grad, const T* w, std::int64_t channels, std::int64_t H, std::int64_t N, std::int64_t L,
                     T* S0, T* S1) {
  parallel_for(H, 1, [&](std::int64_t h_begin, std::int64_t h_end) {
    std::vector<T> table_re(N * kBlock), table_im(N * kBlock);
    std::vector<T> t0_re(N), t0_im(N), t1_re(N), t1_im(N);
    std::vector<Complex> s0(N), s1(N);
    T g[kBlock], jg[kBlock];
    for (std::int64_t h = h_begin; h < h_end; ++h) {
      const std::vector<Complex> wh = load_w(w + 2 * h * N, N);
      power_table(wh, /*by_n=*/false, table_re.data(), table_im.data());
      for (std::int64_t c = 0; c < channels; ++c) {
        const S* gc = grad + (c * H + h) * L;
        std::fill(s0.begin(), s0.end(), Complex{0.0, 0.0});
        std::fill(s1.begin(), s1.end(), Complex{0.0, 0.0});
        Anchors anchors(wh);
        for (std::int64_t block = 0, l0 = 0; l0 < L; ++block, l0 += kBlock) {
          if (block > 0) anchors.advance(block);
          const std::int64_t len = std::min(kBlock, L - l0);
          for (std::int64_t j = 0; j < len; ++j) {
            g[j] = to_acc(gc[l0 + j]);
            jg[j] = static_cast<T>(j) * g[j];
          }
          // Block sums T0 = sum_j g_j exp(j w), T1 = sum_j j g_j exp(j w), vectorized over n.
          std::fill(t0_re.begin(), t0_re.end(), T(0));
          std::fill(t0_im.begin(), t0_im.end(), T(0));
          std::fill(t1_re.begin(), t1_re.end(), T(0));
          std::fill(t1_im.begin(), t1_im.end(), T(0));
          for (std::int64_t j = 0; j < len; ++j) {
            const T* er = table_re.data() + j * N;
            const T* ei = table_im.data() + j * N;
            const T gj = g[j], jgj = jg[j];
            for (std::int64_t n = 0; n < N; ++n) {
              t0_re[n] += gj * er[n];
              t0_im[n] += gj * ei[n];
              t1_re[n] += jgj * er[n];
              t1_im[n] += jgj * ei[n];
            }
          }
          // S0 += a T0, S1 += a (l0 T0 + T1) with a = exp(l0 w), in double.
          const double shift = static_cast<double>(l0);
          for (std::int64_t n = 0; n < N; ++n) {
            const Complex t0{static_cast<double>(t0_re[n]), static_cast<double>(t0_im[n])};
            const Complex t1{shift * t0.re + t1_re[n], shift * t0.im + t1_im[n]};
            const Complex p0 = mul(anchors[n], t0), p1 = mul(anchors[n], t1);
            s0[n].re += p0.re;
            s0[n].im += p0.im;
            s1[n].re += p1.re;
            s1[n].im += p1.im;
          }
        }
        T* out0 = S0 + 2 * (c * H + h) * N;
        T* out1 = S1 + 2 * (c * H + h) * N;
        for (std::int64_t n = 0; n < N; ++n) {
          out0[2 * n] = static_cast<T>(s0[n].re);
          out0[2 * n + 1] = static_cast<T>(s0[n].im);
          out1[2 * n] = static_cast<T>(s1[n].re);
          out1[2 * n + 1] = static_cast<T>(s1[n].im);
        }
      }
    }
  });
}

}  // namespace

void ssm_vandermonde_fwd(int dtype, const void* W, const void* w, std::int64_t channels, std::int64_t H,
                         std::int64_t N, std::int64_t L, void* K) {
  dispatch_float(dtype, "ssm_vandermonde_fwd", [&](auto tag) {
    using S = typename decltype(tag)::type;
    using T = acc_t<S>;
    vandermonde_fwd<S>(static_cast<const T*>(W), static_cast<const T*>(w), channels, H, N, L, static_cast<S*>(K));
  });
}

void ssm_vandermonde_bwd(int dtype, const void* grad, const void* w, std::int64_t channels, std::int64_t H,
                         std::int64_t N, std::int64_t L, void* S0, void* S1) {
  dispatch_float(dtype, "ssm_vandermonde_bwd", [&](auto tag) {
    using S = typename decltype(tag)::type;
    using T = acc_t<S>;
    vandermonde_bwd<S>(static_cast<const S*>(grad), static_cast<const T*>(w), channels, H, N, L, static_cast<T*>(S0),
                       static_cast<T*>(S1));
  });
}

}  // namespace pyfast::cpu
