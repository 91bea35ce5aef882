// Fused router scores + top-k + renormalization, and its backward (reference.topk_gating).
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/row_math.h"

namespace pyfast::cpu {
namespace {

// Inserts (key, index) into the descending list best[0..size); strict comparisons keep the
// lower index first among equal keys because indices arrive in increasing order.
template <typename A>
inline void push_topk(A key, int index, int k, int& size, A* best_key, int* best_index) {
  if (size == k && !(key > best_key[k - 1])) return;
  int pos = size < k ? size++ : k - 1;
  while (pos > 0 && key > best_key[pos - 1]) {
    best_key[pos] = best_key[pos - 1];
    best_index[pos] = best_index[pos - 1];
    --pos;
  }
  best_key[pos] = key;
  best_index[pos] = index;
}

template <typename T>
std::int64_t topk_gating_fwd(const T* logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride, int k,
                             bool softmax, acc_t<T> temperature, bool renormalize, const acc_t<T>* bias,
                             T* weights, std::int32_t* choices, bool check) {
  using A = acc_t<T>;
  std::int64_t nonfinite = 0;
  parallel_for(tokens, row_grain(experts), [&](std::int64_t begin, std::int64_t end) {
    A z[kMaxExperts], p[kMaxExperts], best_key[kMaxTopK], w[kMaxTopK];
    int best[kMaxTopK];
    std::int64_t bad = 0;
    for (std::int64_t t = begin; t < end; ++t) {
      const T* row = logits + t * stride;
      T* w_out = weights + t * k;
      std::int32_t* e_out = choices + t * k;
      if (check && !row_finite(row, experts)) {
        ++bad;
        std::fill(w_out, w_out + k, from_acc<T>(A(0)));
        for (int j = 0; j < k; ++j) e_out[j] = j;
        continue;
      }
      load_row(row, experts, temperature, z);
      const A shift = softmax ? row_max(z, experts) : A(0);
      // Full scores are needed for a bias key, or for the softmax denominator without renormalization.
      const bool all_scores = bias != nullptr;
      const A total = softmax && (all_scores || !renormalize) ? sum_exp(z, experts, shift) : A(1);
      if (all_scores) {
        for (std::int64_t e = 0; e < experts; ++e) p[e] = softmax ? exp_vec(z[e] - shift) / total : sigmoid(z[e]);
      }
      int size = 0;
      for (std::int64_t e = 0; e < experts; ++e) {
        push_topk(all_scores ? p[e] + bias[e] : z[e], static_cast<int>(e), k, size, best_key, best);
      }
      A picked = 0;
      for (int j = 0; j < k; ++j) {
        const A zj = z[best[j]];
        w[j] = all_scores ? p[best[j]] : softmax ? exp_vec(zj - shift) / total : sigmoid(zj);
        picked += w[j];
      }
      for (int j = 0; j < k; ++j) {
        w_out[j] = from_acc<T>(renormalize ? w[j] / picked : w[j]);
        e_out[j] = best[j];
      }
    }
    if (bad) {
PYFAST_OMP(omp atomic)
      nonfinite += bad;
    }
  });
  return nonfinite;
}

template <typename T>
void topk_gating_bwd(const acc_t<T>* grad, const T* logits, std::int64_t tokens, std::int64_t experts,
                     std::int64_t stride, const std::int32_t* choices, int k, bool softmax, acc_t<T> temperature,
                     bool renormalize, T* grad_logits) {
  using A = acc_t<T>;
  parallel_for(tokens, row_grain(experts), [&](std::int64_t begin, std::int64_t end) {
    A z[kMaxExperts], dz[kMaxExperts], w[kMaxTopK];
    for (std::int64_t t = begin; t < end; ++t) {
      const A* g = grad + t * k;
      const std::int32_t* sel = choices + t * k;
      const T* row = logits + t * stride;
      std::fill(dz, dz + experts, A(0));
      if (softmax && !renormalize) {  // w_j = p_{e_j}: dz_i = p_i ([i selected] g_i - <g, w>)
        load_row(row, experts, temperature, z);
        const A shift = row_max(z, experts);
        const A total = sum_exp(z, experts, shift);
        A dot = 0;
        for (int j = 0; j < k; ++j) dot += g[j] * (exp_vec(z[sel[j]] - shift) / total);
        for (std::int64_t e = 0; e < experts; ++e) dz[e] = -(exp_vec(z[e] - shift) / total) * dot;
        for (int j = 0; j < k; ++j) dz[sel[j]] += exp_vec(z[sel[j]] - shift) / total * g[j];
      } else {  // only the selected logits matter
        for (int j = 0; j < k; ++j) z[j] = to_acc(row[sel[j]]) / temperature;
        if (softmax) {  // w = softmax over the selected z: dz_sel = w (g - <g, w>)
          const A shift = row_max(z, k);
          A total = 0, dot = 0;
          for (int j = 0; j < k; ++j) total += (w[j] = exp_vec(z[j] - shift));
          for (int j = 0; j < k; ++j) dot += g[j] * (w[j] /= total);
          for (int j = 0; j < k; ++j) dz[sel[j]] = w[j] * (g[j] - dot);
        } else {
          A total = 0, dot = 0;
          for (int j = 0; j < k; ++j) total += (w[j] = sigmoid(z[j]));
          if (renormalize) {  // w = p / S: dp_j = (g_j - <g, p / S>) / S
            for (int j = 0; j < k; ++j) dot += g[j] * w[j] / total;
          }
          for (int j = 0; j < k; ++j) {
            const A dp = renormalize ? (g[j] - dot) / total : g[j];
            dz[sel[j]] = dp * w[j] * sigmoid(-z[j]);  // p (1 - p) without cancellation near p = 1
          }
        }
      }
      T* out = grad_logits + t * experts;
      for (std::int64_t e = 0; e < experts; ++e) out[e] = from_acc<T>(dz[e] / temperature);
    }
  });
}

}  // namespace

std::int64_t moe_topk_gating_fwd(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                                 std::int64_t stride, int k, bool softmax, const void* temperature_acc,
                                 bool renormalize, const void* bias_acc, void* weights, std::int32_t* choices,
                                 bool check) {
  check_row_sizes("moe_topk_gating_fwd", experts, k);
  return dispatch_float(dtype, "moe_topk_gating_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    return topk_gating_fwd<T>(static_cast<const T*>(logits), tokens, experts, stride, k, softmax,
                              *static_cast<const A*>(temperature_acc), renormalize,
                              static_cast<const A*>(bias_acc), static_cast<T*>(weights), choices, check);
  });
}

void moe_topk_gating_bwd(int dtype, const void* grad_weights_acc, const void* logits, std::int64_t tokens,
                         std::int64_t experts, std::int64_t stride, const std::int32_t* choices, int k, bool softmax,
                         const void* temperature_acc, bool renormalize, void* grad_logits) {
  check_row_sizes("moe_topk_gating_bwd", experts, k);
  dispatch_float(dtype, "moe_topk_gating_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    topk_gating_bwd<T>(static_cast<const A*>(grad_weights_acc), static_cast<const T*>(logits), tokens, experts,
                       stride, choices, k, softmax, *static_cast<const A*>(temperature_acc), renormalize,
                       static_cast<T*>(grad_logits));
  });
}

}  // namespace pyfast::cpu
