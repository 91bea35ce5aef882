// y = x W^T with W decoded on the fly from packed power-grid codes (reference.power_linear), and
// the dequantization of W (reference.dequantize). Semantics and layout: quant.h.
//
// Decode GEMV/GEMM for few rows of x: every thread owns a range of output columns n; for each n it
// decodes the row W[n] 8 codes at a time (scale folded into the per-group table) and multiplies it
// with up to kMaxRows rows of x held in float, one accumulator vector per row of x.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/half.h"
#include "common/parallel.h"
#include "cpu/quant/decode.h"
#include "cpu/quant/quant.h"

namespace pyfast::cpu {
namespace {

using namespace quant;

constexpr int kMaxRows = 8;                 // rows of x per decoded row of W (accumulators in registers)
constexpr std::int64_t kColumnGrain = 32;   // output columns per scheduled block

using TileFn = void (*)(const float* x, std::int64_t K, const QuantWeight& w, std::int64_t n, float* out);

// out[m] = sum_k x[m, k] W[n, k] for MB rows of x (contiguous float, row length K).
template <int Bits, int MB>
void linear_tile_scalar(const float* x, std::int64_t K, const QuantWeight& w, std::int64_t n, float* out) {
  const std::uint8_t* row = w.codes + n * w.row_bytes;
  const float* scales = w.scales + n * (K / w.group_size);
  ScalarDecoder<Bits> decoder;
  float acc[MB][8] = {};
  float values[8];
  for (std::int64_t k = 0; k < K; k += 8) {
    if (k % w.group_size == 0) decoder.set_group(w.group_table(n, k / w.group_size), scales[k / w.group_size]);
    decoder.decode(row + (k / 8) * Bits, values);
    for (int m = 0; m < MB; ++m) {
      for (int i = 0; i < 8; ++i) acc[m][i] += x[m * K + k + i] * values[i];
    }
  }
  for (int m = 0; m < MB; ++m) {
    float total = 0;
    for (int i = 0; i < 8; ++i) total += acc[m][i];
    out[m] = total;
  }
}

#ifdef PYFAST_X86
// Few rows of x give few independent FMA chains: then two blocks of 8 codes go to two accumulator
// sets, so the FMA latency (4-5 cycles) is not the bound.
template <int Bits, int MB>
PYFAST_AVX2 void linear_tile_avx2(const float* x, std::int64_t K, const QuantWeight& w, std::int64_t n, float* out) {
  constexpr int kChains = MB <= 4 ? 2 : 1;
  const std::uint8_t* block = w.codes + n * w.row_bytes;
  const float* scales = w.scales + n * (K / w.group_size);
  Avx2Decoder<Bits> decoder;
  __m256 acc[kChains][MB];
  for (int c = 0; c < kChains; ++c) {
    for (int m = 0; m < MB; ++m) acc[c][m] = _mm256_setzero_ps();
  }
  for (std::int64_t k = 0, g = 0; k < K; ++g) {
    decoder.set_group(w.group_table(n, g), scales[g]);
    const std::int64_t end = k + w.group_size;
    for (; k + 8 * kChains <= end; k += 8 * kChains, block += Bits * kChains) {
      for (int c = 0; c < kChains; ++c) {
        const __m256 values = decoder.decode(block + c * Bits);
        for (int m = 0; m < MB; ++m) acc[c][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * c), values, acc[c][m]);
      }
    }
    if (k < end) {  // an odd block when kChains == 2
      const __m256 values = decoder.decode(block);
      for (int m = 0; m < MB; ++m) acc[0][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), values, acc[0][m]);
      k += 8;
      block += Bits;
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int c = 1; c < kChains; ++c) acc[0][m] = _mm256_add_ps(acc[0][m], acc[c][m]);
    out[m] = hsum(acc[0][m]);
  }
}

// One row of x against W[n] for 4-bit codes and group sizes that are multiples of 32, through
// Avx2ByteDecoder4 (decoders[e] for table e); x is in the shuffled order (`shuffled_position`
// within each block of 32).
PYFAST_AVX2 void linear_row_avx2_bytes(const float* x, std::int64_t K, const QuantWeight& w, const Avx2ByteDecoder4* decoders,
                                       std::int64_t n, float* out) {
  const std::uint8_t* block = w.codes + n * w.row_bytes;
  const float* scales = w.scales + n * (K / w.group_size);
  const std::uint8_t* index = w.table_index == nullptr ? nullptr : w.table_index + n * (K / w.group_size);
  __m256 total = _mm256_setzero_ps();
  __m256 values[4];
  for (std::int64_t k = 0, g = 0; k < K; ++g) {
    const Avx2ByteDecoder4& decoder = decoders[index == nullptr ? 0 : index[g]];
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (const std::int64_t end = k + w.group_size; k < end; k += 32, block += 16) {
      decoder.decode(block, values);
      for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * r), values[r], acc[r]);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    total = _mm256_fmadd_ps(sum, _mm256_set1_ps(scales[g]), total);
  }
  out[0] = hsum(total);
}
#endif

template <int Bits, int MB>
TileFn tile_for() {
#ifdef PYFAST_X86
  if (has_avx2()) return &linear_tile_avx2<Bits, MB>;
#endif
  return &linear_tile_scalar<Bits, MB>;
}

template <int Bits>
TileFn tile_for_rows(int rows) {
  switch (rows) {
    case 1: return tile_for<Bits, 1>();
    case 2: return tile_for<Bits, 2>();
    case 3: return tile_for<Bits, 3>();
    case 4: return tile_for<Bits, 4>();
    case 5: return tile_for<Bits, 5>();
    case 6: return tile_for<Bits, 6>();
    case 7: return tile_for<Bits, 7>();
    default: return tile_for<Bits, kMaxRows>();
  }
}

template <typename F>
decltype(auto) dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: throw std::invalid_argument("quant: unsupported bits " + std::to_string(bits));
  }
}

// Calls f(TypeTag<T>{}) for the activation storage types the kernels take.
template <typename F>
decltype(auto) dispatch_activation(int tag, const char* what, F&& f) {
  if (tag == kFloat64) throw std::invalid_argument(std::string(what) + ": float64 runs the reference");
  return dispatch_float(tag, what, std::forward<F>(f));
}

// A single row of 4-bit x W^T goes through the byte-shuffle decoder (fewer instructions per code
// than the vperm lookups, which pay off only when shared by several rows of x).
template <int Bits>
bool use_byte_decoder(std::int64_t M, const QuantWeight& w) {
#ifdef PYFAST_X86
  return Bits == 4 && M == 1 && w.group_size % 32 == 0 && has_avx2();
#else
  return false;
#endif
}

template <int Bits, typename T>
void power_linear(const T* x, std::int64_t M, std::int64_t x_stride, const QuantWeight& w, T* y, std::int64_t y_stride) {
  const std::int64_t K = w.cols;
  const bool bytes = use_byte_decoder<Bits>(M, w);
  std::vector<float> xf(static_cast<std::size_t>(M * K));
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t at = bytes ? (k & ~std::int64_t{31}) + shuffled_position(static_cast<int>(k & 31)) : k;
      xf[m * K + at] = to_acc(x[m * x_stride + k]);
    }
  }
#ifdef PYFAST_X86
  std::vector<Avx2ByteDecoder4> decoders;
  if (bytes) {
    for (int e = 0; e < w.tables; ++e) decoders.emplace_back(w.table + (e << Bits));
  }
#endif
  // Column blocks are handed out dynamically: on a shared machine a descheduled thread then delays
  // one block, not a whole static half of the output.
  const std::int64_t blocks = (w.rows + kColumnGrain - 1) / kColumnGrain;
PYFAST_OMP(omp parallel for schedule(dynamic, 1) if (blocks > 1))
  for (std::int64_t b = 0; b < blocks; ++b) {
    float out[kMaxRows];
    for (std::int64_t n = b * kColumnGrain; n < std::min(w.rows, (b + 1) * kColumnGrain); ++n) {
#ifdef PYFAST_X86
      if (bytes) {
        linear_row_avx2_bytes(xf.data(), K, w, decoders.data(), n, out);
        y[n] = from_acc<T>(out[0]);
        continue;
      }
#endif
      for (std::int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<std::int64_t>(kMaxRows, M - m0));
        tile_for_rows<Bits>(rows)(xf.data() + m0 * K, K, w, n, out);
        for (int m = 0; m < rows; ++m) y[(m0 + m) * y_stride + n] = from_acc<T>(out[m]);
      }
    }
  }
}

// One row of W decoded into `out` (K elements). Inlined into the AVX2 and the portable callers.
template <typename Decoder, int Bits, typename T>
__attribute__((always_inline)) inline void dequantize_row(const QuantWeight& w, std::int64_t n, T* out) {
  const std::uint8_t* row = w.codes + n * w.row_bytes;
  const float* scales = w.scales + n * (w.cols / w.group_size);
  Decoder decoder;
  float values[8];
  for (std::int64_t k = 0; k < w.cols; k += 8) {
    if (k % w.group_size == 0) decoder.set_group(w.group_table(n, k / w.group_size), scales[k / w.group_size]);
    decoder.decode(row + (k / 8) * Bits, values);
    for (int i = 0; i < 8; ++i) out[k + i] = from_acc<T>(values[i]);
  }
}

template <int Bits, typename T>
void dequantize_rows_scalar(const QuantWeight& w, std::int64_t n0, std::int64_t n1, T* out) {
  for (std::int64_t n = n0; n < n1; ++n) dequantize_row<ScalarDecoder<Bits>, Bits>(w, n, out + n * w.cols);
}

#ifdef PYFAST_X86
template <int Bits, typename T>
PYFAST_AVX2 void dequantize_rows_avx2(const QuantWeight& w, std::int64_t n0, std::int64_t n1, T* out) {
  for (std::int64_t n = n0; n < n1; ++n) dequantize_row<Avx2StoringDecoder<Bits>, Bits>(w, n, out + n * w.cols);
}
#endif

}  // namespace

void quant_power_linear_fwd(int dtype, const void* x, std::int64_t M, std::int64_t x_stride, const QuantWeight& w,
                            void* y, std::int64_t y_stride) {
  dispatch_activation(dtype, "quant_power_linear_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bits(w.bits, [&](auto bits) {
      power_linear<decltype(bits)::value, T>(static_cast<const T*>(x), M, x_stride, w, static_cast<T*>(y), y_stride);
    });
  });
}

void quant_dequantize(int dtype, const QuantWeight& w, void* out) {
  dispatch_activation(dtype, "quant_dequantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bits(w.bits, [&](auto bits) {
      constexpr int Bits = decltype(bits)::value;
      T* o = static_cast<T*>(out);
      parallel_for(w.rows, kColumnGrain, [&](std::int64_t n0, std::int64_t n1) {
#ifdef PYFAST_X86
        if (has_avx2()) return dequantize_rows_avx2<Bits, T>(w, n0, n1, o);
#endif
        dequantize_rows_scalar<Bits, T>(w, n0, n1, o);
      });
    });
  });
}

}  // namespace pyfast::cpu
