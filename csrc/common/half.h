// float16 / bfloat16 <-> float conversions (round to nearest even, as torch's .to()), and the
// accumulation type of every storage type: double for double, float otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace pyfast {

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The conversions are branch-free (selects only), so loops over rows of 16-bit data vectorize.
// Half <-> float follows the FP16 library's IEEE algorithms (the ones c10::Half uses without F16C):
// exact for every input, round to nearest even, NaN stays NaN.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t w = static_cast<std::uint32_t>(h) << 16;
  const std::uint32_t sign = w & 0x80000000u;
  const std::uint32_t two_w = w + w;  // exponent and mantissa at the top, sign shifted out
  // Normal / inf / nan: rebias the exponent by 0xE0 (so 0x1F -> 0xFF), then scale by 2^-112.
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * bits_float(15u << 23);
  // Zero / subnormal: mantissa * 2^-24 built as (0.5 + mantissa * 2^-24) - 0.5, exact.
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const std::uint32_t small = 0u - static_cast<std::uint32_t>(two_w < (1u << 27));  // masked select
  return bits_float(sign | (float_bits(denormalized) & small) | (float_bits(normalized) & ~small));
}

inline std::uint16_t float_to_half(float f) {
  // Scale up then down so that the float addition below rounds the mantissa to the half grid
  // (to nearest even) and overflow becomes inf.
  float base = (std::fabs(f) * bits_float(239u << 23)) * bits_float(17u << 23);  // * 2^112 * 2^-110
  const std::uint32_t w = float_bits(f);
  const std::uint32_t shl1_w = w + w;
  const std::uint32_t sign = w & 0x80000000u;
  std::uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;  // half subnormals share the smallest normal grid
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const std::uint32_t bits = float_bits(base);
  const std::uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  // NaN -> 0x7E00, selected with a mask (a ?: here becomes a branch that blocks vectorization).
  const std::uint32_t nan = 0u - static_cast<std::uint32_t>(shl1_w > 0xFF000000u);
  return static_cast<std::uint16_t>((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
}

inline float bfloat16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

// Round to nearest even on the upper 16 bits; NaN becomes the quiet NaN 0x7FC0 (as c10::BFloat16).
inline std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<std::uint16_t>(nan ? 0x7FC0u : rounded);
}

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(Half v) { return half_to_float(v.bits); }
inline float to_acc(BFloat16 v) { return bfloat16_to_float(v.bits); }

template <typename T>
inline T from_acc(acc_t<T> v);
template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }
template <>
inline Half from_acc<Half>(float v) { return Half{float_to_half(v)}; }
template <>
inline BFloat16 from_acc<BFloat16>(float v) { return BFloat16{float_to_bfloat16(v)}; }

}  // namespace pyfast
