"""Specification of pyfast's EK-FAC influence ops in plain torch, the slow and obvious way.

Every op in `pyfast.influence` is tested against these functions. They build explicit
per-example gradients ``G_n = sum_t s_{n,t} a_{n,t}^T`` (b x d_out x d_in) and compute in float32,
or float64 for float64 inputs (eigendecompositions always in float64).

Shapes: b examples (sequences) of T tokens; ``a (b, T, d_in)`` layer inputs (with a column of ones
when the layer has a bias, `append_bias_column`), ``s (b, T, d_out)`` gradients of the summed loss
w.r.t. the layer outputs, ``mask (b, T)`` True (or 1) for tokens that count. Conventions follow
kronfluence: A and S are means over unmasked tokens, Lambda a mean over examples, damping
0.1 x mean(Lambda) when unset, scores not divided by the number of training examples.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .factors import Eigen, EKFACFactors, LowRankQuery

DEFAULT_DAMPING_FACTOR = 0.1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def append_bias_column(a: Tensor) -> Tensor:
    """``(..., d_in) -> (..., d_in + 1)``: the bias of ``y = W a + b`` as a weight column on ones."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def _masked(x: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x if mask is None else x * mask.to(dtype).unsqueeze(-1)


def covariance(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``(1/N) sum_t x_t x_t^T`` over the N unmasked rows of ``x (..., d)``; ``mask`` has shape
    ``x.shape[:-1]``. Returns ``(d, d)`` in `compute_dtype`."""
    acc = compute_dtype(x.dtype)
    rows = _masked(x, mask, acc).reshape(-1, x.shape[-1])
    count = rows.shape[0] if mask is None else mask.to(acc).sum()
    return rows.T @ rows / count


def _symmetric_eigh(M: Tensor) -> tuple:
    M = M.to(torch.float64)
    return torch.linalg.eigh(0.5 * (M + M.T))


def eigen_factors(A: Tensor, S: Tensor, name: str = "layer") -> Eigen:
    """Eigendecompositions of the symmetrized ``A (d_in, d_in)`` and ``S (d_out, d_out)`` in float64.
    Non-finite statistics raise a ValueError naming ``name`` and the statistic."""
    for stat, M in (("A (activation covariance)", A), ("S (gradient covariance)", S)):
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"eigen_factors: {name}: {stat} has non-finite values (NaN or Inf)")
    eig_A, Q_A = _symmetric_eigh(A)
    eig_S, Q_S = _symmetric_eigh(S)
    return Eigen(eig_A, Q_A, eig_S, Q_S)


def per_example_gradients(a: Tensor, s: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``G_n = sum_t s_{n,t} a_{n,t}^T`` over unmasked tokens: ``(b, d_out, d_in)``."""
    acc = compute_dtype(a.dtype)
    return torch.einsum("bto,bti->boi", s.to(acc), _masked(a, mask, acc))


def lambda_correction(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Corrected eigenvalues ``Lambda = (1/b) sum_n (Q_S^T G_n Q_A)^2`` (elementwise square), ``(d_out, d_in)``."""
    G = per_example_gradients(a, s, mask)
    rotated = Q_S.to(G.dtype).T @ G @ Q_A.to(G.dtype)
    return rotated.square().mean(dim=0)


def default_damping(Lambda: Tensor) -> float:
    """kronfluence's heuristic: 0.1 x mean(Lambda)."""
    return DEFAULT_DAMPING_FACTOR * float(Lambda.mean())


def precondition(V: Tensor, factors: EKFACFactors, damping: Optional[float] = None) -> Tensor:
    """Damped EK-FAC inverse-Hessian product ``Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T`` for
    ``V (..., d_out, d_in)``, in `compute_dtype` of ``V``."""
    acc = compute_dtype(V.dtype)
    Q_A, Q_S, Lambda = (t.to(acc) for t in factors)
    damping = default_damping(factors.Lambda) if damping is None else damping
    rotated = Q_S.T @ V.to(acc) @ Q_A
    return Q_S @ (rotated / (Lambda + damping)) @ Q_A.T


def low_rank(P: Tensor, rank: int) -> LowRankQuery:
    """Best rank-``rank`` factorization (truncated SVD) of ``P (q, d_out, d_in)``:
    ``left = U_r diag(sigma_r)``, ``right = V_r^T``."""
    U, sigma, Vh = torch.linalg.svd(P, full_matrices=False)
    r = min(rank, sigma.shape[-1])
    return LowRankQuery(U[..., :r] * sigma[..., None, :r], Vh[..., :r, :])


def dense_query(query: Union[Tensor, LowRankQuery]) -> Tensor:
    """``(q, d_out, d_in)``: a low-rank query multiplied out."""
    return query.left @ query.right if isinstance(query, LowRankQuery) else query


def pairwise_scores(
    query: Union[Tensor, LowRankQuery], a: Tensor, s: Tensor, mask: Optional[Tensor] = None, per_token: bool = False
) -> Tensor:
    """Influence of training examples on queries: ``<P_q, G_n>`` for preconditioned query gradients
    ``P (q, d_out, d_in)`` (or a `LowRankQuery`). Returns ``(q, b)``, or ``(q, b, T)`` per-token scores
    ``<P_q, s_{n,t} a_{n,t}^T>`` (masked tokens 0) that sum over t to the sequence scores."""
    acc = compute_dtype(a.dtype)
    P = dense_query(query).to(acc)
    if per_token:
        token_grads = torch.einsum("bto,bti->btoi", s.to(acc), _masked(a, mask, acc))
        return torch.einsum("qoi,btoi->qbt", P, token_grads)
    G = per_example_gradients(a, s, mask)
    return torch.einsum("qoi,boi->qb", P, G)


def self_scores(
    a: Tensor, s: Tensor, factors: EKFACFactors, damping: Optional[float] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Self-influence ``<H^-1 G_n, G_n>`` of each example: ``(b,)``."""
    G = per_example_gradients(a, s, mask)
    return (precondition(G, factors, damping) * G).sum(dim=(1, 2))
