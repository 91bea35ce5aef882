"""The specification of pyfast.gp in plain torch (any float dtype; float64 for tests).

Conventions:
- A grid has sizes ``(n_1, ..., n_D)``; a grid vector ``v`` has shape ``(N,)`` or ``(N, B)``
  with ``N = n_1 * ... * n_D`` in row-major order, so ``K = K_1 (x) ... (x) K_D`` is
  ``torch.kron(K_1, torch.kron(K_2, ...))`` (the last mode varies fastest).
- Dense operators here build ``K`` explicitly: they are for small grids and define the answers.
- Stationary 1-D kernels are functions of ``d = x - x'``; mixtures carry log-domain weights
  (``w_q = exp(log_weights_q)``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Kronecker algebra
# --------------------------------------------------------------------------------------------------


def kron(factors: Sequence[Tensor]) -> Tensor:
    """Dense ``K_1 (x) ... (x) K_D`` of shape ``(prod m_d, prod n_d)``."""
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out.contiguous(), f.contiguous())  # torch.kron rejects some strided inputs
    return out


def kron_diag(diagonals: Sequence[Tensor]) -> Tensor:
    """``diag(D_1) (x) ... (x) diag(D_D)`` as a vector of length ``prod n_d``."""
    out = diagonals[0]
    for d in diagonals[1:]:
        out = torch.outer(out, d).reshape(-1)
    return out


def kron_mv(factors: Sequence[Tensor], v: Tensor, transpose: bool = False) -> Tensor:
    """``(K_1 (x) ... (x) K_D) v`` (or with every ``K_d`` transposed); ``K_d`` is ``(m_d, n_d)``,
    ``v`` is ``(prod n_d,)`` or ``(prod n_d, B)``; the result has ``prod m_d`` rows."""
    mats = [f.transpose(0, 1) if transpose else f for f in factors]
    return kron(mats) @ v


def mode_product(matrix: Tensor, v: Tensor, grid: Sequence[int], mode: int, transpose: bool = False) -> Tensor:
    """Apply ``matrix`` (``(m, n_mode)``, or its transpose) along axis ``mode`` of the grid:
    ``(I (x) ... (x) M (x) ... (x) I) v``."""
    mats = [torch.eye(n, dtype=v.dtype, device=v.device) for n in grid]
    mats[mode] = matrix.transpose(0, 1) if transpose else matrix
    return kron(mats) @ v


# --------------------------------------------------------------------------------------------------
# Dense solves, log-determinants and the marginal likelihood of K + noise * D
# --------------------------------------------------------------------------------------------------


def covariance(factors: Sequence[Tensor], noise: Tensor, diagonals: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Dense ``K_1 (x) ... (x) K_D + noise * D`` with ``D = I`` or ``diag(D_1) (x) ... (x) diag(D_D)``."""
    K = kron(factors)
    d = torch.ones(K.shape[0], dtype=K.dtype, device=K.device) if diagonals is None else kron_diag(diagonals)
    return K + torch.diag(noise * d)


def solve(factors, noise, y, diagonals=None) -> Tensor:
    """``(K + noise D)^{-1} y`` by a dense Cholesky solve."""
    L = torch.linalg.cholesky(covariance(factors, noise, diagonals))
    rhs = y.unsqueeze(-1) if y.dim() == 1 else y
    return torch.cholesky_solve(rhs, L).reshape(y.shape)


def logdet(factors, noise, diagonals=None) -> Tensor:
    """``log |K + noise D|``."""
    L = torch.linalg.cholesky(covariance(factors, noise, diagonals))
    return 2 * torch.log(torch.diagonal(L)).sum()


def inv_quad_logdet(factors, noise, y, diagonals=None):
    """``(y^T (K + noise D)^{-1} y, log |K + noise D|)``; the quadratic form has one entry per
    column of ``y`` (shape ``()`` for a vector)."""
    alpha = solve(factors, noise, y, diagonals)
    return (y * alpha).sum(0), logdet(factors, noise, diagonals)


def marginal_log_likelihood(factors, noise, y, diagonals=None) -> Tensor:
    """``log N(y | 0, K + noise D)``, one entry per column of ``y`` (shape ``()`` for a vector)."""
    quad, ld = inv_quad_logdet(factors, noise, y, diagonals)
    return -0.5 * quad - 0.5 * ld - 0.5 * y.shape[0] * math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------------
# 1-D stationary kernels k(x - x') and their input derivatives
# --------------------------------------------------------------------------------------------------


def _diff(x1: Tensor, x2: Tensor) -> Tensor:
    return x1[:, None] - x2[None, :]


def rbf(x1, x2, lengthscale, variance=1.0) -> Tensor:
    """``variance * exp(-d^2 / (2 l^2))``."""
    d = _diff(x1, x2)
    return variance * torch.exp(-0.5 * (d / lengthscale) ** 2)


_MATERN = {
    "1/2": (1.0, lambda r: torch.ones_like(r)),
    "3/2": (math.sqrt(3.0), lambda r: 1 + math.sqrt(3.0) * r),
    "5/2": (math.sqrt(5.0), lambda r: 1 + math.sqrt(5.0) * r + 5.0 / 3.0 * r * r),
}


def _matern_of_d(d: Tensor, nu: str, lengthscale) -> Tensor:
    a, poly = _MATERN[nu]
    # |d| as sqrt(d^2 + tiny): smooth at d = 0, so autograd gives the exact k'(0) = 0 and k''(0).
    r = torch.sqrt(d * d + torch.finfo(d.dtype).tiny) / lengthscale
    return poly(r) * torch.exp(-a * r)


def matern(x1, x2, lengthscale, nu: str = "5/2", variance=1.0) -> Tensor:
    """Matern kernel, ``nu`` in ``"1/2" | "3/2" | "5/2"``: ``variance * p_nu(r) exp(-a_nu r)``,
    ``r = |d| / l``, ``a = 1, sqrt 3, sqrt 5``, ``p = 1, 1 + a r, 1 + a r + a^2 r^2 / 3``."""
    return variance * _matern_of_d(_diff(x1, x2), nu, lengthscale)


def spectral_mixture(x1, x2, log_weights, lengthscales, means, component: str = "gauss") -> Tensor:
    """GP-HM per-dimension mixture ``sum_q w_q g_q(d) cos(2 pi mu_q d)``, ``w_q = exp(log_weights_q)``;
    ``component="gauss"``: ``g_q = exp(-d^2 / l_q^2)``; ``"matern52"`` (Student-t spectrum):
    ``g_q`` the Matern 5/2 kernel with lengthscale ``l_q``. Parameters are ``(Q,)``."""
    d = _diff(x1, x2)[None]
    ls = lengthscales[:, None, None]
    if component == "gauss":
        g = torch.exp(-(d / ls) ** 2)
    else:
        g = _matern_of_d(d, "5/2", ls)
    comps = torch.exp(log_weights)[:, None, None] * g * torch.cos(2 * math.pi * means[:, None, None] * d)
    return comps.sum(0)


def kernel_derivatives(kernel_fn, x1: Tensor, x2: Tensor):
    """``(K, dK/dx, d2K/dx dx')`` of ``K_ij = k(x1_i, x2_j)`` by autograd (float64 spec of the fused
    kernels): ``dK/dx_ij = d k / d x1_i`` and ``d2K/dx dx'_ij = d^2 k / d x1_i d x2_j``."""
    x1 = x1.detach().requires_grad_(True)
    x2 = x2.detach().requires_grad_(True)
    K = kernel_fn(x1, x2)
    # K_ij depends on x1_i only, so the gradient of column sums gives d/dx1_i per column j.
    n1, n2 = K.shape
    dK = torch.stack([torch.autograd.grad(K[:, j].sum(), x1, create_graph=True)[0] for j in range(n2)], 1)
    d2K = torch.stack([torch.autograd.grad(dK[i, :].sum(), x2, retain_graph=True)[0] for i in range(n1)], 0)
    return K.detach(), dK.detach(), d2K.detach()
