// CPU kernels of pyfast.quant on raw pointers. Semantics: pyfast/quant/reference.py.
//
// A quantized weight W (N, K) is `codes` (N, row_bytes) uint8 in the bit-stream layout of
// reference.pack_codes (code k of a row in bits [bits*k, bits*k + bits), 8 codes per `bits` bytes),
// `scales` (N, K / group_size) float32 and `table` (tables, 2^bits) float32, the dequantized value of
// each code at scale 1 for each exponent: W[n, k] = scales[n, g] * table[e(n, g), code(n, k)],
// g = k / group_size, e(n, g) = table_index[n, g] (per-group exponents) or 0 (table_index null).
// group_size must be a multiple of 8 (a block of 8 codes never straddles two groups).
#pragma once

#include <cstdint>

namespace pyfast::cpu {

struct QuantWeight {
  const std::uint8_t* codes;
  std::int64_t rows;       // N
  std::int64_t cols;       // K
  std::int64_t row_bytes;  // bits * ceil(K / 8)
  const float* scales;     // (N, K / group_size), contiguous
  std::int64_t group_size;
  const float* table;      // (tables, 2^bits)
  int bits;                // 3, 4 or 8
  const std::uint8_t* table_index;  // (N, K / group_size), contiguous, or nullptr: one table
  int tables;                       // rows of `table` (1 without table_index)

  std::int64_t groups() const { return cols / group_size; }
  // The 2^bits levels of group g of row n.
  const float* group_table(std::int64_t n, std::int64_t g) const {
    return table_index == nullptr ? table : table + (static_cast<std::int64_t>(table_index[n * groups() + g]) << bits);
  }
};

// y (M, N) = x (M, K) W^T in x's float dtype (float32/float16/bfloat16), float32 accumulation.
// x and y have unit stride along the last axis and row strides x_stride / y_stride (elements).
void quant_power_linear_fwd(int dtype, const void* x, std::int64_t M, std::int64_t x_stride, const QuantWeight& w,
                            void* y, std::int64_t y_stride);

// out (N, K) contiguous in `dtype` (float32/float16/bfloat16) = W.
void quant_dequantize(int dtype, const QuantWeight& w, void* out);

}  // namespace pyfast::cpu
