// Router auxiliary losses (reference.load_balancing_loss, reference.router_z_loss) and their
// backwards. Reductions over tokens use fixed chunks summed in order: deterministic results.
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/row_math.h"

namespace pyfast::cpu {
namespace {

constexpr std::int64_t kChunk = 256;

// p = softmax(row) (from_logits) or the row itself, in the accumulation type.
template <typename T>
inline void router_probs(const T* row, std::int64_t experts, bool from_logits, acc_t<T>* p) {
  using A = acc_t<T>;
  load_row(row, experts, A(1), p);
  if (!from_logits) return;
  const A shift = row_max(p, experts);
  A total = 0;
  for (std::int64_t e = 0; e < experts; ++e) total += (p[e] = std::exp(p[e] - shift));
  for (std::int64_t e = 0; e < experts; ++e) p[e] /= total;
}

// f_e = fraction of the tokens * k assignments routed to e (ids outside [0, E) are ignored).
template <typename A>
std::vector<A> assignment_fraction(const std::int32_t* choices, std::int64_t n, std::int64_t experts) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(experts), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    if (choices[i] >= 0 && choices[i] < experts) ++counts[choices[i]];
  }
  std::vector<A> fraction(static_cast<std::size_t>(experts));
  for (std::int64_t e = 0; e < experts; ++e) fraction[e] = n ? A(counts[e]) / A(n) : A(0);
  return fraction;
}

template <typename T>
acc_t<T> load_balancing_loss(const T* router, std::int64_t tokens, std::int64_t experts, std::int64_t stride,
                             const std::int32_t* choices, int k, bool from_logits) {
  using A = acc_t<T>;
  if (tokens == 0) return A(0);
  const std::int64_t chunks = (tokens + kChunk - 1) / kChunk;
  std::vector<A> partial(static_cast<std::size_t>(chunks * experts), A(0));
  parallel_chunks(tokens, kChunk, [&](std::int64_t c, std::int64_t begin, std::int64_t end) {
    A p[kMaxExperts];
    A* column_sum = partial.data() + c * experts;
    for (std::int64_t t = begin; t < end; ++t) {
      router_probs(router + t * stride, experts, from_logits, p);
      for (std::int64_t e = 0; e < experts; ++e) column_sum[e] += p[e];
    }
  });
  const std::vector<A> fraction = assignment_fraction<A>(choices, tokens * k, experts);
  A loss = 0;
  for (std::int64_t e = 0; e < experts; ++e) {
    A column = 0;
    for (std::int64_t c = 0; c < chunks; ++c) column += partial[c * experts + e];
    loss += fraction[e] * column / A(tokens);
  }
  return A(experts) * loss;
}

template <typename T>
void load_balancing_loss_bwd(acc_t<T> grad, const T* router, std::int64_t tokens, std::int64_t experts,
                             std::int64_t stride, const std::int32_t* choices, int k, bool from_logits,
                             T* grad_router) {
  using A = acc_t<T>;
  if (tokens == 0) return;
  // dL/dp_te = c_e = grad * E * f_e / T; through the softmax: p (c - <c, p>).
  std::vector<A> c = assignment_fraction<A>(choices, tokens * k, experts);
  for (A& v : c) v *= grad * A(experts) / A(tokens);
  parallel_for(tokens, row_grain(experts), [&](std::int64_t begin, std::int64_t end) {
    A p[kMaxExperts];
    for (std::int64_t t = begin; t < end; ++t) {
      T* out = grad_router + t * experts;
      if (!from_logits) {
        for (std::int64_t e = 0; e < experts; ++e) out[e] = from_acc<T>(c[e]);
        continue;
      }
      router_probs(router + t * stride, experts, true, p);
      A dot = 0;
      for (std::int64_t e = 0; e < experts; ++e) dot += c[e] * p[e];
      for (std::int64_t e = 0; e < experts; ++e) out[e] = from_acc<T>(p[e] * (c[e] - dot));
    }
  });
}

template <typename A>
inline A logsumexp(const A* z, std::int64_t n) {
  const A shift = row_max(z, n);
  return shift + std::log(sum_exp(z, n, shift));
}

template <typename T>
acc_t<T> router_z_loss(const T* logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride) {
  using A = acc_t<T>;
  if (tokens == 0) return A(0);
  const std::int64_t chunks = (tokens + kChunk - 1) / kChunk;
  std::vector<A> partial(static_cast<std::size_t>(chunks), A(0));
  parallel_chunks(tokens, kChunk, [&](std::int64_t c, std::int64_t begin, std::int64_t end) {
    A z[kMaxExperts];
    for (std::int64_t t = begin; t < end; ++t) {
      load_row(logits + t * stride, experts, A(1), z);
      const A lse = logsumexp(z, experts);
      partial[c] += lse * lse;
    }
  });
  A total = 0;
  for (A v : partial) total += v;
  return total / A(tokens);
}

template <typename T>
void router_z_loss_bwd(acc_t<T> grad, const T* logits, std::int64_t tokens, std::int64_t experts,
                       std::int64_t stride, T* grad_logits) {
  using A = acc_t<T>;
  // d/dz_te mean_t lse_t^2 = 2 lse_t softmax(z_t)_e / T
  parallel_for(tokens, row_grain(experts), [&](std::int64_t begin, std::int64_t end) {
    A z[kMaxExperts];
    for (std::int64_t t = begin; t < end; ++t) {
      load_row(logits + t * stride, experts, A(1), z);
      const A lse = logsumexp(z, experts);
      const A scale = grad * A(2) * lse / A(tokens);
      T* out = grad_logits + t * experts;
      for (std::int64_t e = 0; e < experts; ++e) out[e] = from_acc<T>(scale * std::exp(z[e] - lse));
    }
  });
}

}  // namespace

void moe_load_balancing_loss_fwd(int dtype, const void* router, std::int64_t tokens, std::int64_t experts,
                                 std::int64_t stride, const std::int32_t* choices, int k, bool from_logits,
                                 void* loss_acc) {
  dispatch_float(dtype, "moe_load_balancing_loss_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    *static_cast<acc_t<T>*>(loss_acc) =
        load_balancing_loss<T>(static_cast<const T*>(router), tokens, experts, stride, choices, k, from_logits);
  });
}

void moe_load_balancing_loss_bwd(int dtype, double grad, const void* router, std::int64_t tokens,
                                 std::int64_t experts, std::int64_t stride, const std::int32_t* choices, int k,
                                 bool from_logits, void* grad_router) {
  dispatch_float(dtype, "moe_load_balancing_loss_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    load_balancing_loss_bwd<T>(static_cast<acc_t<T>>(grad), static_cast<const T*>(router), tokens, experts, stride,
                               choices, k, from_logits, static_cast<T*>(grad_router));
  });
}

void moe_router_z_loss_fwd(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                           std::int64_t stride, void* loss_acc) {
  dispatch_float(dtype, "moe_router_z_loss_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    *static_cast<acc_t<T>*>(loss_acc) = router_z_loss<T>(static_cast<const T*>(logits), tokens, experts, stride);
  });
}

void moe_router_z_loss_bwd(int dtype, double grad, const void* logits, std::int64_t tokens, std::int64_t experts,
                           std::int64_t stride, void* grad_logits) {
  dispatch_float(dtype, "moe_router_z_loss_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    router_z_loss_bwd<T>(static_cast<acc_t<T>>(grad), static_cast<const T*>(logits), tokens, experts, stride,
                         static_cast<T*>(grad_logits));
  });
}

}  // namespace pyfast::cpu
