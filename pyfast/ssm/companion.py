"""SpaceTime companion-matrix SSM kernel by its transfer function, O(d^3 log L + (d + L) log L).

With ``A = S + a e_d^T`` (S the down-shift) the truncated generating function of
``K[l] = c^T A^l b`` at the L-th roots of unity ``z`` (where ``z^L = 1``) is

    sum_{l<L} K[l] z^l = c~^T (I - z A)^-1 b,      c~ = (I - A^L)^T c,

and Woodbury on the rank-one part, with ``M = (I - z S)^-1 = sum_k z^k S^k``, gives

    c~^T (I - z A)^-1 b = P_cb(z) + z P_ca(z) P_db(z) / (1 - z P_da(z)),   P_xy(z) = x^T M y,

polynomials of degree < d whose coefficients are cross-correlations (``x^T S^k y =
sum_j x_j y_{j-k}``; for ``x = e_d``: ``y_{d-1-k}``). An FFT of each polynomial at L points and one
inverse FFT give K. ``A^L`` comes from repeated squaring (``matrix_power``: log L products of
d x d matrices), never from L matrix-vector products. Autograd differentiates all of it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import companion_matrix


def is_stable(a: Tensor) -> Tensor:
    """``(H,)`` bool: every eigenvalue of the companion matrix of ``a (H, d)`` has modulus < 1.

    Schur-Cohn step-down on the characteristic polynomial ``1 - sum_i a_(d-i) z^-i``: stable iff
    every reflection coefficient has ``|k| < 1``. O(d^2), where eigenvalue solvers converge
    slowly on the clustered spectra of nearly nilpotent companion matrices.
    """
    alpha = -a.detach().double().flip(-1)  # alpha_i (i = 1..d) at index i - 1
    stable = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for m in range(a.shape[-1], 0, -1):
        k = alpha[:, m - 1]
        stable &= k.abs() < 1
        k = torch.where(stable, k, 0).unsqueeze(-1)
        head = alpha[:, : m - 1]
        alpha = (head - k * head.flip(-1)) / (1 - k * k)
    return stable


def _correlation(x: Tensor, y: Tensor) -> Tensor:
    """``r[k] = sum_j x[j] y[j - k]`` for ``k < d`` (last axis), by FFT of size 2d."""
    d = x.shape[-1]
    n = 2 * d
    return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(y, n=n).conj(), n=n)[..., :d]


def _at_roots_of_unity(coefficients: Tensor, L: int) -> Tensor:
    """``sum_k coefficients[k] w^(m k)`` for ``w = exp(-2 pi i / L)``, ``m < L`` (folding k mod L)."""
    d = coefficients.shape[-1]
    if d > L:
        folded = coefficients.new_zeros(*coefficients.shape[:-1], L)
        index = torch.arange(d, device=coefficients.device) % L
        coefficients = folded.index_add(-1, index, coefficients)
    return torch.fft.fft(coefficients, n=L)


def companion_kernel_fft(a: Tensor, b: Tensor, c: Tensor, L: int) -> Tensor:
    """``K (H, L)`` from ``a, b, c (H, d)`` (see the module docstring); needs ``|eig(A)| < 1``."""
    A_L = torch.linalg.matrix_power(companion_matrix(a), L)
    c_tilde = c - (A_L.transpose(-1, -2) @ c.unsqueeze(-1)).squeeze(-1)
    P_cb = _at_roots_of_unity(_correlation(c_tilde, b), L)
    P_ca = _at_roots_of_unity(_correlation(c_tilde, a), L)
    P_db = _at_roots_of_unity(b.flip(-1), L)
    P_da = _at_roots_of_unity(a.flip(-1), L)
    z = torch.exp(-2j * torch.pi * torch.arange(L, device=a.device, dtype=a.dtype) / L)
    transfer = P_cb + z * P_ca * P_db / (1 - z * P_da)
    return torch.fft.ifft(transfer, n=L).real.to(a.dtype)
