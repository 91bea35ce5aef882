"""Specification of pyfast's SSM ops in plain torch (any precision, float64 / complex128 included).

Every kernel in `pyfast.ssm` is tested against these functions; they get their gradients from torch
autograd. Shapes: B batch, H channels of the signal (SSM copies), N complex state size (the
conjugate-pair half: the real state has size 2N), L sequence length.

Conventions:
- ``dt (H,)`` is the *linear* step size, every entry > 0. Layers keep ``log_dt`` as the parameter
  and pass ``exp(log_dt)``.
- ``A (H, N)`` complex with ``Re(A) < 0``: one eigenvalue of each conjugate pair; ``C (channels, H, N)``
  complex; B is folded into C (S4D), so ``K[c, h, l] = 2 Re(sum_n C'[c, h, n] Abar[h, n]^l)``.
- ``zoh``: ``Abar = exp(dt A)``, ``C' = C (exp(dt A) - 1) / A``;
  ``bilinear``: ``Abar = (1 + dt A / 2) / (1 - dt A / 2)``, ``C' = C dt / (1 - dt A / 2)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

DISCRETIZATIONS = ("zoh", "bilinear")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# S4D kernel
# --------------------------------------------------------------------------------------------------


def discretize(dt: Tensor, A: Tensor, C: Tensor, discretization: str = "zoh") -> Tuple[Tensor, Tensor]:
    """``(W (channels, H, N), w (H, N))`` complex with ``K[c, h, l] = 2 Re(sum_n W[c,h,n] exp(l w[h,n]))``.

    ``w = log(Abar)`` (``dt A`` for zoh) and ``W = C'`` of the module docstring.
    """
    dtA = dt.unsqueeze(-1) * A
    if discretization == "zoh":
        return C * (torch.exp(dtA) - 1) / A, dtA
    denominator = 1 - dtA / 2
    return C * (dt.unsqueeze(-1) / denominator), torch.log((1 + dtA / 2) / denominator)


def s4d_kernel(dt: Tensor, A: Tensor, C: Tensor, L: int, *, discretization: str = "zoh") -> Tensor:
    """S4D convolution kernel ``K (channels, H, L)`` real, by the materialized Vandermonde product.

    Args: ``dt (H,)`` real > 0 (linear step), ``A (H, N)`` complex, ``C (channels, H, N)`` complex.
    K has dt's dtype; float16/bfloat16 dt is computed in float32 and K rounded once.
    """
    W, w = discretize(dt.to(compute_dtype(dt.dtype)), A, C, discretization)
    positions = torch.arange(L, device=A.device, dtype=w.real.dtype)
    vandermonde = torch.exp(w.unsqueeze(-1) * positions)  # (H, N, L): what the kernels never build
    return (2 * torch.einsum("chn,hnl->chl", W, vandermonde).real).to(dt.dtype)


def s4d_kernel_matrix_power(dt: Tensor, A: Tensor, C: Tensor, L: int, *, discretization: str = "zoh") -> Tensor:
    """The same kernel from its definition ``K[l] = C Abar^l Bbar`` on the full 2N-state system
    (both halves of each conjugate pair, ``B = 1``), discretized with matrix functions
    (``Abar = expm(dt A)``, ``Bbar = A^-1 (Abar - I) B`` or the bilinear solves). Small sizes only."""
    channels, H, N = C.shape
    out = torch.empty(channels, H, L, dtype=dt.dtype, device=dt.device)
    for h in range(H):
        a = torch.diag(torch.cat([A[h], A[h].conj()]))
        b = torch.ones(2 * N, 1, dtype=A.dtype, device=A.device)
        eye = torch.eye(2 * N, dtype=A.dtype, device=A.device)
        if discretization == "zoh":
            a_bar = torch.linalg.matrix_exp(dt[h] * a)
            b_bar = torch.linalg.solve(a, (a_bar - eye) @ b)
        else:
            left = eye - dt[h] / 2 * a
            a_bar = torch.linalg.solve(left, eye + dt[h] / 2 * a)
            b_bar = torch.linalg.solve(left, dt[h] * b)
        c = torch.cat([C[:, h], C[:, h].conj()], dim=-1)  # (channels, 2N)
        state = b_bar
        for l in range(L):
            out[:, h, l] = (c @ state).squeeze(-1).real
            state = a_bar @ state
    return out


def s4d_step(
    state: Tensor, u_t: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    *, discretization: str = "zoh",
) -> Tuple[Tensor, Tensor]:
    """One recurrent step: ``x' = Abar x + Bbar u_t``, ``y = 2 Re(sum_n C_n x'_n) + D u_t``.

    Args: ``state (batch, H, N)`` complex, ``u_t (batch, H)`` real, ``dt (H,)``, ``A, B, C (H, N)``
    complex, ``D (H,)`` real or None. Returns ``(y (batch, H), new state)``. Running it over
    ``u[..., l]`` from a zero state equals ``fft_conv(u, s4d_kernel(dt, A, (C * B)[None], L)[0], D)``.
    """
    Bc = B.unsqueeze(0)
    W, w = discretize(dt, A, Bc, discretization)  # Bbar = W (B in the role of C), Abar = exp(w)
    state = torch.exp(w) * state + W[0] * u_t.unsqueeze(-1)
    y = 2 * (state * C).sum(-1).real
    if D is not None:
        y = y + D * u_t
    return y.to(u_t.dtype), state


# --------------------------------------------------------------------------------------------------
# FFT long convolution
# --------------------------------------------------------------------------------------------------


def _full_kernel(k: Tensor, n: int, bidirectional: bool) -> Tensor:
    """The length-n circular kernel: causal lags ``0..L-1`` from ``k[0]`` (or ``k``), anti-causal lags
    ``-1..-L`` from ``k[1]`` at indices ``n-1..n-L`` (``n >= 2L``)."""
    if not bidirectional:
        return torch.nn.functional.pad(k, (0, n - k.shape[-1]))
    L = k.shape[-1]
    return torch.cat([k[0], k.new_zeros(k.shape[1], n - 2 * L), k[1].flip(-1)], dim=-1)


def fft_conv(
    u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, bidirectional: bool = False,
    pregate: Optional[Tensor] = None, postgate: Optional[Tensor] = None,
) -> Tensor:
    """Long convolution ``y = postgate * (v * k + D v)`` with ``v = pregate * u``, by FFT of size 2L.

    Causal: ``(v * k)[t] = sum_{s <= t} k[t - s] v[s]``. Bidirectional (``k (2, H, L)``): plus the
    anti-causal part ``sum_{s > t} k[1, s - t - 1] v[s]``. Shapes: ``u (B, H, L)``, ``k (H, L)`` or
    ``(2, H, L)``, ``D (H,)``, gates ``(B, H, L)``. Computed in float32 (float64 for float64 u);
    returns ``u.dtype``.
    """
    acc = compute_dtype(u.dtype)
    L = u.shape[-1]
    v = u.to(acc) if pregate is None else u.to(acc) * pregate.to(acc)
    n = 2 * L
    spectrum = torch.fft.rfft(_full_kernel(k.to(acc), n, bidirectional), n=n)
    y = torch.fft.irfft(torch.fft.rfft(v, n=n) * spectrum, n=n)[..., :L]
    if D is not None:
        y = y + D.to(acc).unsqueeze(-1) * v
    if postgate is not None:
        y = y * postgate.to(acc)
    return y.to(u.dtype)


def fft_conv_direct(
    u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, bidirectional: bool = False,
    pregate: Optional[Tensor] = None, postgate: Optional[Tensor] = None,
) -> Tensor:
    """`fft_conv` by its O(L^2) definition (a Toeplitz matrix per channel), for tests."""
    acc = compute_dtype(u.dtype)
    L = u.shape[-1]
    v = u.to(acc) if pregate is None else u.to(acc) * pregate.to(acc)
    lag = torch.arange(L).unsqueeze(1) - torch.arange(L).unsqueeze(0)  # t - s
    causal = k[0] if bidirectional else k
    toeplitz = torch.where(lag >= 0, causal.to(acc)[:, lag.clamp(min=0)], 0)
    if bidirectional:
        toeplitz = toeplitz + torch.where(lag < 0, k[1].to(acc)[:, (-lag - 1).clamp(min=0)], 0)
    y = torch.einsum("hts,bhs->bht", toeplitz, v)
    if D is not None:
        y = y + D.to(acc).unsqueeze(-1) * v
    if postgate is not None:
        y = y * postgate.to(acc)
    return y.to(u.dtype)


# --------------------------------------------------------------------------------------------------
# Companion (SpaceTime) kernel
# --------------------------------------------------------------------------------------------------


def companion_matrix(a: Tensor) -> Tensor:
    """``A (H, d, d)``: ones on the subdiagonal (the shift ``A e_i = e_{i+1}``) and last column ``a (H, d)``."""
    H, d = a.shape
    A = torch.diag_embed(a.new_ones(H, d - 1), offset=-1)
    A[:, :, -1] = a
    return A


def companion_kernel_matrix_power(a: Tensor, b: Tensor, c: Tensor, L: int) -> Tensor:
    """SpaceTime companion SSM kernel by its definition ``K[h, l] = c_h^T A_h^l b_h``, ``(H, L)``,
    one matrix-vector product per position (small sizes only). ``a, b, c (H, d)`` real."""
    A = companion_matrix(a)
    state = b.unsqueeze(-1)
    out = []
    for _ in range(L):
        out.append((c.unsqueeze(-2) @ state)[..., 0, 0])
        state = A @ state
    return torch.stack(out, -1)


# --------------------------------------------------------------------------------------------------
# Initializations
# --------------------------------------------------------------------------------------------------


def s4d_lin_init(H: int, N: int, dtype: torch.dtype = torch.complex64) -> Tensor:
    """S4D-Lin: ``A_n = -1/2 + i pi n`` for every channel, ``(H, N)``."""
    n = torch.arange(N, dtype=torch.float64)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n).expand(H, N).to(dtype).clone()


def s4d_inv_init(H: int, N: int, dtype: torch.dtype = torch.complex64) -> Tensor:
    """S4D-Inv: ``A_n = -1/2 + i N / pi (N / (2n + 1) - 1)``, ``(H, N)``."""
    n = torch.arange(N, dtype=torch.float64)
    imag = N / math.pi * (N / (2 * n + 1) - 1)
    return torch.complex(torch.full_like(n, -0.5), imag).expand(H, N).to(dtype).clone()


def hippo_legs(size: int) -> Tensor:
    """HiPPO-LegS ``(size, size)`` float64: ``A_nk = -sqrt(2n+1) sqrt(2k+1)`` (n > k), ``-(n+1)`` (n = k)."""
    n = torch.arange(size, dtype=torch.float64)
    root = (2 * n + 1).sqrt()
    return torch.tril(-root.unsqueeze(1) * root.unsqueeze(0), diagonal=-1) - torch.diag(n + 1)


def _upper_half(eigenvalues: Tensor, N: int) -> Tensor:
    """Indices of N eigenvalues of a real 2N-matrix, one per conjugate pair (Im >= 0; real ones
    count as their own pair), smallest Im first."""
    upper = (eigenvalues.imag >= 0).nonzero().flatten()
    return upper[torch.argsort(eigenvalues.imag[upper], stable=True)][:N]


def s4d_legs_init(H: int, N: int, dtype: torch.dtype = torch.complex64) -> Tensor:
    """S4D-LegS: the eigenvalues of the normal part ``A + P P^T`` (``P_n = sqrt(n + 1/2)``) of
    HiPPO-LegS of size 2N, one per conjugate pair, ``(H, N)`` (real parts are -1/2)."""
    P = (torch.arange(2 * N, dtype=torch.float64) + 0.5).sqrt()
    normal = hippo_legs(2 * N) + P.unsqueeze(1) * P.unsqueeze(0)
    eigenvalues = torch.linalg.eigvals(normal)
    return eigenvalues[_upper_half(eigenvalues, N)].expand(H, N).to(dtype).clone()


class PTDInit(NamedTuple):
    """S4-PTD initialization: ``A (H, N)`` and ``B (H, N)`` complex, and the 2-norm condition number
    of the eigenvector matrix of the perturbed matrix (the quantity the perturbation controls)."""

    A: Tensor
    B: Tensor
    condition_number: float
    perturbation: float


def s4_ptd_init(
    H: int, N: int, perturbation: float = 1e-2, *, seed: int = 0, dtype: torch.dtype = torch.complex64
) -> PTDInit:
    """Perturb-then-diagonalize HiPPO-LegS (size 2N): ``A_H + E = V diag(lambda) V^-1`` with ``E`` a
    random real Gaussian matrix scaled to ``||E||_2 = perturbation * ||A_H||_2``. Unperturbed, V has
    condition number ~1e10 at 2N = 16 (~1e20 at 2N = 64); a perturbation of 1e-2 brings it to ~1e2.
    Returns one eigenvalue per conjugate pair (real eigenvalues count as their own pair), with
    ``B = V^-1 B_H`` (``B_H,n = sqrt(2n + 1)``). Eigenvalues the perturbation pushes to
    ``Re >= 0`` are reflected to the left half plane, so the layer stays stable.
    """
    if not perturbation > 0:
        raise ValueError(f"s4_ptd_init: perturbation must be > 0, got {perturbation}")
    A_H = hippo_legs(2 * N)
    gen = torch.Generator().manual_seed(seed)
    E = torch.randn(2 * N, 2 * N, dtype=torch.float64, generator=gen)
    E = E * (perturbation * torch.linalg.matrix_norm(A_H, 2) / torch.linalg.matrix_norm(E, 2))
    eigenvalues, V = torch.linalg.eig(A_H + E)
    condition = float(torch.linalg.cond(V))
    B_H = (2 * torch.arange(2 * N, dtype=torch.float64) + 1).sqrt().to(V.dtype)
    B = torch.linalg.solve(V, B_H)
    order = _upper_half(eigenvalues, N)
    lam = eigenvalues[order]
    lam = torch.complex(-lam.real.abs().clamp_min(1e-4), lam.imag)
    return PTDInit(lam.expand(H, N).to(dtype).clone(), B[order].expand(H, N).to(dtype).clone(), condition, perturbation)
