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
    r = d.abs() / lengthscale
    return poly(r) * torch.exp(-a * r)


def matern(x1, x2, lengthscale, nu: str = "5/2", variance=1.0) -> Tensor:
    """Matern kernel, ``nu`` in ``"1/2" | "3/2" | "5/2"``: ``variance * p_nu(r) exp(-a_nu r)``,
    ``r = |d| / l``, ``a = 1, sqrt 3, sqrt 5``, ``p = 1, 1 + a r, 1 + a r + a^2 r^2 / 3``."""
    return variance * _matern_of_d(_diff(x1, x2), nu, lengthscale)


COMPONENTS = ("rbf", "sm_gauss", "matern12", "matern32", "matern52")


def _component(d: Tensor, component: str, lengthscale) -> Tensor:
    if component == "rbf":
        return torch.exp(-0.5 * (d / lengthscale) ** 2)
    if component == "sm_gauss":
        return torch.exp(-((d / lengthscale) ** 2))
    return _matern_of_d(d, {"matern12": "1/2", "matern32": "3/2", "matern52": "5/2"}[component], lengthscale)


def mixture_kernel(x1, x2, log_weights, lengthscales, means=None, component: str = "sm_gauss") -> Tensor:
    """``K_ij = sum_q w_q g(d; l_q) cos(2 pi mu_q d)``, ``d = x1_i - x2_j``, ``w_q = exp(log_weights_q)``.

    ``component`` names ``g``: ``"rbf"`` ``exp(-d^2 / (2 l^2))``; ``"sm_gauss"`` ``exp(-d^2 / l^2)``
    (GP-HM's Gaussian spectral mixture); ``"matern12" | "matern32" | "matern52"`` (``matern52`` with
    frequencies is GP-HM's Student-t mixture). ``means=None`` means ``mu = 0`` (no cosine): with
    ``Q = 1`` these are the plain RBF / Matern kernels with variance ``exp(log_weights)``.
    Parameters are ``(Q,)``; this spec materializes ``(Q, n1, n2)``.
    """
    d = _diff(x1, x2)[None]
    g = _component(d, component, lengthscales[:, None, None])
    comps = torch.exp(log_weights)[:, None, None] * g
    if means is not None:
        comps = comps * torch.cos(2 * math.pi * means[:, None, None] * d)
    return comps.sum(0)


def kernel_derivatives(kernel_fn, x1: Tensor, x2: Tensor):
    """``(K, dK/dx, d2K/dx dx')`` of ``K_ij = k(x1_i, x2_j)`` by autograd (the spec of the fused
    kernels): ``dK/dx_ij = d k / d x1_i`` and ``d2K/dx dx'_ij = d^2 k / d x1_i d x2_j``. The results
    stay differentiable w.r.t. the kernel's parameters. Autograd through ``|d|`` cannot give a
    Matern kernel's ``k''(0)`` (it returns 0 there); `matern_mixed_derivative_at_zero` is the limit."""
    x1 = x1.detach().requires_grad_(True)
    x2 = x2.detach().requires_grad_(True)
    K = kernel_fn(x1, x2)
    # K_ij depends on x1_i only, so the gradient of column j's sum is column j of dK/dx.
    n1, n2 = K.shape
    dK = torch.stack([torch.autograd.grad(K[:, j].sum(), x1, create_graph=True)[0] for j in range(n2)], 1)
    d2K = torch.stack([torch.autograd.grad(dK[i, :].sum(), x2, create_graph=True)[0] for i in range(n1)], 0)
    return K, dK, d2K


def matern_mixed_derivative_at_zero(log_weights, lengthscales, means, component: str) -> Tensor:
    """``d2K/dx dx' = -k''(0)`` of a Matern 3/2 or 5/2 mixture: ``sum_q w_q (c / l_q^2 + (2 pi mu_q)^2)``
    with ``c = 3`` (3/2) or ``5/3`` (5/2), the limit of the closed form as ``d -> 0``."""
    c = 3.0 if component == "matern32" else 5.0 / 3.0
    f2 = 0.0 if means is None else (2 * math.pi * means) ** 2
    return (torch.exp(log_weights) * (c / lengthscales**2 + f2)).sum()
