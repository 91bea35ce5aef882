// ST-MoE router z-loss (reference.router_z_loss) and its backward: one pass over the logits, the
// exponentials computed once per element and vectorized 8 wide on AVX2 CPUs (run_widest).
#include <cmath>
#include <vector>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/row_math.h"

namespace pyfast::cpu {
namespace {

// Rows per chunk of the sum: chunk partials are added in chunk order, so the sum does not depend
// on the thread count.
constexpr std::int64_t kChunkRows = 256;

template <typename T>
double lse_square_sum(const T* logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride) {
  using A = acc_t<T>;
  const std::int64_t chunks = (tokens + kChunkRows - 1) / kChunkRows;
  std::vector<double> partial(static_cast<std::size_t>(chunks), 0.0);
  parallel_chunks(tokens, kChunkRows, [&](std::int64_t chunk, std::int64_t begin, std::int64_t end) {
    run_widest([&]() PYFAST_INLINE {
      A z[kMaxExperts];
      double sum = 0;
      for (std::int64_t t = begin; t < end; ++t) {
        load_row(logits + t * stride, experts, z);
        const A shift = row_max(z, experts);
        const double lse = shift + std::log(sum_exp(z, experts, shift));
        sum += lse * lse;
      }
      partial[chunk] = sum;
    });
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

// d/dlogits of scale * sum_t lse_t^2 / 2 = scale * lse_t * softmax(logits_t).
template <typename T>
void z_loss_bwd(const T* logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride, acc_t<T> scale,
                T* grad_logits) {
  using A = acc_t<T>;
  parallel_for(tokens, row_grain(experts), [&](std::int64_t begin, std::int64_t end) {
    run_widest([&]() PYFAST_INLINE {
      A p[kMaxExperts];
      for (std::int64_t t = begin; t < end; ++t) {
        load_row(logits + t * stride, experts, p);
        const A shift = row_max(p, experts);
        A total = 0;
PYFAST_OMP(omp simd reduction(+ : total))
        for (std::int64_t e = 0; e < experts; ++e) total += (p[e] = exp_vec(p[e] - shift));
        const A factor = scale * (shift + std::log(total)) / total;  // scale * lse_t / sum exp
        T* out = grad_logits + t * experts;
        for (std::int64_t e = 0; e < experts; ++e) out[e] = from_acc<T>(factor * p[e]);
      }
    });
  });
}

}  // namespace

double moe_router_lse_square_sum(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                                 std::int64_t stride) {
  check_row_sizes("moe_router_lse_square_sum", experts);
  return dispatch_float(dtype, "moe_router_lse_square_sum", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return lse_square_sum<T>(static_cast<const T*>(logits), tokens, experts, stride);
  });
}

void moe_router_z_loss_bwd(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                           std::int64_t stride, const void* scale_acc, void* grad_logits) {
  check_row_sizes("moe_router_z_loss_bwd", experts);
  dispatch_float(dtype, "moe_router_z_loss_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    z_loss_bwd<T>(static_cast<const T*>(logits), tokens, experts, stride, *static_cast<const acc_t<T>*>(scale_acc),
                  static_cast<T*>(grad_logits));
  });
}

}  // namespace pyfast::cpu
