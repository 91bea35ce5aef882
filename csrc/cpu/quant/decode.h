// Decoding blocks of 8 codes of the bit-stream layout (quant.h) into 8 floats `scale * table[code]`.
// ScalarDecoder runs anywhere; Avx2Decoder (compiled for AVX2 + FMA, selected at run time) looks the
// codes up in registers: a 16-entry table is two 8-lane vperm lookups and a blend on bit 3.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cpu_features.h"

namespace pyfast::cpu::quant {

// The `Bits` bytes of one block of 8 codes as a little-endian word. (Whole-register loads and
// shifts: a partial memcpy into a wider word would stall on store forwarding.)
template <int Bits>
inline std::uint64_t block_word(const std::uint8_t* block) {
  if constexpr (Bits == 3) {
    std::uint16_t low;
    std::memcpy(&low, block, 2);
    return low | (static_cast<std::uint64_t>(block[2]) << 16);
  } else if constexpr (Bits == 4) {
    std::uint32_t word;
    std::memcpy(&word, block, 4);  // little-endian host (x86, aarch64)
    return word;
  } else {
    std::uint64_t word;
    std::memcpy(&word, block, 8);
    return word;
  }
}

template <int Bits>
struct ScalarDecoder {
  float table[1 << Bits];

  void set_group(const float* base, float scale) {
    for (int c = 0; c < (1 << Bits); ++c) table[c] = base[c] * scale;
  }
  void decode(const std::uint8_t* block, float* out) const {
    const std::uint64_t word = block_word<Bits>(block);
    for (int i = 0; i < 8; ++i) out[i] = table[(word >> (Bits * i)) & ((1u << Bits) - 1)];
  }
};

// Where input i (0..31) of a block of 32 sits in Avx2ByteDecoder4's output registers.
inline int shuffled_position(int i) { return ((i % 16) / 4) * 8 + (i / 16) * 4 + i % 4; }

#ifdef PYFAST_X86
template <int Bits>
struct Avx2Decoder;

template <>
struct Avx2Decoder<3> {
  __m256 table;
  PYFAST_AVX2 void set_group(const float* base, float scale) { table = _mm256_mul_ps(_mm256_loadu_ps(base), _mm256_set1_ps(scale)); }
  PYFAST_AVX2 __m256 decode(const std::uint8_t* block) const {
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i word = _mm256_set1_epi32(static_cast<int>(block_word<3>(block)));
    return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(word, shifts));  // vperm reads the low 3 bits
  }
};

template <>
struct Avx2Decoder<4> {
  __m256 low, high;  // table[0..7], table[8..15]
  PYFAST_AVX2 void set_group(const float* base, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    low = _mm256_mul_ps(_mm256_loadu_ps(base), s);
    high = _mm256_mul_ps(_mm256_loadu_ps(base + 8), s);
  }
  PYFAST_AVX2 __m256 decode(const std::uint8_t* block) const {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i codes = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(block_word<4>(block))), shifts);
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));  // bit 3 -> sign bit
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, codes), _mm256_permutevar8x32_ps(high, codes), upper);
  }
};

template <>
struct Avx2Decoder<8> {
  const float* table;
  __m256 scale;
  PYFAST_AVX2 void set_group(const float* base, float s) {
    table = base;
    scale = _mm256_set1_ps(s);
  }
  PYFAST_AVX2 __m256 decode(const std::uint8_t* block) const {
    const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block)));
    return _mm256_mul_ps(_mm256_i32gather_ps(table, codes, 4), scale);
  }
};

// 4-bit codes through byte shuffles, 32 codes at a time: the 16 float levels are split into four
// byte planes (plane j = byte j of every level) and vpshufb looks up all four bytes of 32 codes in
// four instructions; byte and word unpacks reassemble the floats. The result comes in four
// registers holding codes {0-3,16-19}, {4-7,20-23}, {8-11,24-27}, {12-15,28-31} of the block
// (`shuffled_position`), so x is permuted to that order once per call. No scale: callers apply
// the group's scale to the group's sum.
struct Avx2ByteDecoder4 {
  std::uint8_t plane[4][32];  // unaligned storage: decoders live in std::vector

  explicit Avx2ByteDecoder4(const float* table) {
    for (int c = 0; c < 16; ++c) {
      std::uint8_t level[4];
      std::memcpy(level, table + c, 4);
      for (int j = 0; j < 4; ++j) plane[j][c] = plane[j][c + 16] = level[j];
    }
  }

  // 32 codes from 16 packed bytes -> out[0..4).
  PYFAST_AVX2 void decode(const std::uint8_t* block, __m256* out) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i even = _mm_and_si128(packed, mask);
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd));
    const __m256i b0 = _mm256_shuffle_epi8(load_plane(0), codes), b1 = _mm256_shuffle_epi8(load_plane(1), codes);
    const __m256i b2 = _mm256_shuffle_epi8(load_plane(2), codes), b3 = _mm256_shuffle_epi8(load_plane(3), codes);
    const __m256i low_a = _mm256_unpacklo_epi8(b0, b1), low_b = _mm256_unpackhi_epi8(b0, b1);
    const __m256i high_a = _mm256_unpacklo_epi8(b2, b3), high_b = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_a, high_a));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_a, high_a));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_b, high_b));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_b, high_b));
  }

  PYFAST_AVX2 __m256i load_plane(int j) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane[j])); }
};

// The decoded block stored to out[0..8) (the interface ScalarDecoder offers).
template <int Bits>
struct Avx2StoringDecoder : Avx2Decoder<Bits> {
  PYFAST_AVX2 void decode(const std::uint8_t* block, float* out) const {
    _mm256_storeu_ps(out, Avx2Decoder<Bits>::decode(block));
  }
};

PYFAST_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

}  // namespace pyfast::cpu::quant
