// CPU kernels of pyfast.ssm on raw pointers. Semantics: pyfast/ssm/reference.py.
#pragma once

#include <cstdint>

namespace pyfast::cpu {

// Fused Vandermonde product of the S4D kernel: K[c, h, l] = 2 Re(sum_n W[c, h, n] exp(l w[h, n])).
// W (channels, H, N, 2) and w (H, N, 2) hold contiguous (re, im) pairs; K (channels, H, L) is
// contiguous. dtype: the storage type of K (any float tag); W and w are in its accumulation type,
// which is also the type of the arithmetic (float64 for kFloat64, float32 otherwise).
void ssm_vandermonde_fwd(int dtype, const void* W, const void* w, std::int64_t channels, std::int64_t H,
                         std::int64_t N, std::int64_t L, void* K);

// Its adjoint sums for the backward pass, per (c, h, n), as (re, im) pairs of shape (channels, H, N, 2):
//   S0 = sum_l g[c, h, l] exp(l w[h, n]),   S1 = sum_l l g[c, h, l] exp(l w[h, n]).
// Then dL/dW = 2 conj(S0) and dL/dw = 2 sum_c conj(W S1) (PyTorch's complex gradient convention).
// dtype: the storage type of grad; w, S0 and S1 are in its accumulation type (as for the forward).
void ssm_vandermonde_bwd(int dtype, const void* grad, const void* w, std::int64_t channels, std::int64_t H,
                         std::int64_t N, std::int64_t L, void* S0, void* S1);

}  // namespace pyfast::cpu
