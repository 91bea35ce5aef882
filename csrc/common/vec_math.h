// Branch-free math that compilers vectorize (std::exp on float does not: it is a libm call per
// element, ~8x slower than torch's vectorized softmax). float gets a Cephes-style exp; double
// keeps std::exp, since float64 is the accuracy path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pyfast {

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for exact
// products), exp(r) by the Cephes expf polynomial: relative error < 2e-7 on [-87.3, 88].
inline float exp_vec(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);  // NaN passes through
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_vec(double x) { return std::exp(x); }

}  // namespace pyfast
