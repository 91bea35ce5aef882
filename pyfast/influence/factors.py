"""Containers of the EK-FAC statistics of one linear layer (W: d_out x d_in, bias as an input column).

    A = E[a a^T]  (d_in, d_in)    S = E[s s^T]  (d_out, d_out)     Q_A, Q_S: their eigenvectors
    Lambda = E_n[(Q_S^T G_n Q_A)^2]  (d_out, d_in),  G_n = sum_t s_{n,t} a_{n,t}^T
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Eigen(NamedTuple):
    """Eigendecompositions of the covariance factors, float64, eigenvalues ascending."""

    eigenvalues_A: Tensor  # (d_in,)
    Q_A: Tensor  # (d_in, d_in), columns are eigenvectors
    eigenvalues_S: Tensor  # (d_out,)
    Q_S: Tensor  # (d_out, d_out)


class EKFACFactors(NamedTuple):
    """What preconditioning needs: the eigenbases and the corrected eigenvalues."""

    Q_A: Tensor  # (d_in, d_in)
    Q_S: Tensor  # (d_out, d_out)
    Lambda: Tensor  # (d_out, d_in)


class LowRankQuery(NamedTuple):
    """A rank-r factorization ``P ~= left @ right`` of preconditioned query gradients."""

    left: Tensor  # (q, d_out, r)
    right: Tensor  # (q, r, d_in)
