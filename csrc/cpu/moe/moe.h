// CPU kernels of pyfast.moe on raw pointers. Row-major 2-D inputs take a row stride (elements);
// the last axis is contiguous. Float arguments named `acc` are double for float64 data, else float.
// Semantics: pyfast/moe/reference.py.
#pragma once

#include <cstdint>

namespace pyfast::cpu {

// Returns the number of rows with a non-finite logit (counted only when `check`).
std::int64_t moe_topk_gating_fwd(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                                 std::int64_t stride, int k, bool softmax, const void* temperature_acc,
                                 bool renormalize, const void* bias_acc, void* weights, std::int32_t* choices,
                                 bool check);

// grad_weights_acc: contiguous (tokens, k) in the accumulation type.
void moe_topk_gating_bwd(int dtype, const void* grad_weights_acc, const void* logits, std::int64_t tokens, std::int64_t experts, std::int64_t stride,
                         const std::int32_t* choices, int k, bool softmax, const void* temperature_acc,
                         bool renormalize, void* grad_logits);

// Returns the number of ids outside [0, experts) (assignments with such ids are left unrouted).
std::int64_t moe_route(const std::int32_t* choices, std::int64_t tokens, int k, std::int64_t experts,
                       std::int64_t capacity, std::int64_t align, std::int64_t rows, std::int64_t* counts,
                       std::int64_t* offsets, std::int64_t* row_of_assignment, std::int64_t* assignment_of_row);

void moe_gather_rows(int dtype, const void* x, std::int64_t d, std::int64_t stride,
                     const std::int64_t* assignment_of_row, std::int64_t rows, int k, const void* scale_acc,
                     void* out);

void moe_combine_rows(int dtype, const void* y, std::int64_t d, std::int64_t stride,
                      const std::int64_t* row_of_assignment, std::int64_t tokens, int k, const void* weights_acc,
                      void* out);

void moe_combine_weights_grad(int dtype, const void* grad_out, std::int64_t grad_stride, const void* y,
                              std::int64_t y_stride, std::int64_t d, const std::int64_t* row_of_assignment,
                              std::int64_t tokens, int k, void* grad_weights_acc);

// Router z-loss (router_z_loss.cpp): sum over tokens of logsumexp(logits_t)^2 in float64; the
// backward writes scale * lse_t * softmax(logits_t) into grad_logits (contiguous).
double moe_router_lse_square_sum(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                                 std::int64_t stride);
void moe_router_z_loss_bwd(int dtype, const void* logits, std::int64_t tokens, std::int64_t experts,
                           std::int64_t stride, const void* scale_acc, void* grad_logits);

// Grouped expert GEMM (expert_gemm.cpp): for each expert e and row r in
// [offsets[e], offsets[e] + counts[e]): out[r][j] = sum_i A_r[i] * w[e * w_expert_stride + j * w_n_stride +
// i * w_k_stride], j < n, i < depth; A_r = a[r] (row stride a_stride), or x[assignment_of_row[r] / k]
// (zero when negative) when assignment_of_row is not null. The other of the `rows` output rows are zeroed.
// float32 / float16 / bfloat16 (computed in float32); needs AVX2 + FMA (moe_expert_gemm_available).
bool moe_expert_gemm_available();
void moe_expert_gemm(int dtype, const void* a, std::int64_t a_stride, const std::int64_t* assignment_of_row, int k,
                     const void* w, std::int64_t w_expert_stride, std::int64_t w_n_stride, std::int64_t w_k_stride,
                     std::int64_t n, std::int64_t depth, const std::int64_t* counts, const std::int64_t* offsets,
                     std::int64_t experts, std::int64_t rows, void* out, std::int64_t out_stride);

}  // namespace pyfast::cpu
