"""Log-determinant of ``A = S^T (K_1 (x) ... (x) K_D) S + diag(noise)`` on an incomplete grid (or a
full grid with heteroscedastic noise) by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017).

``log|A| = log|P| + tr log(B)`` with ``B = P^{-1/2} A P^{-1/2}`` and an SPD ``P`` whose log-det is
exact:

- full grid: ``P = K + mean(noise) I`` (a `KroneckerGrid`; ``P^{-1/2} = Q diag(L^{-1/2}) Q^T``),
  so ``B = I + P^{-1/2} diag(noise - mean) P^{-1/2}``: exact (``B = I``) for one noise level;
- masked grid: the Jacobi scaling ``P = diag(A)`` (``diag(K)`` is the Kronecker product of the
  factors' diagonals).

``tr log(B)`` is Hutchinson's estimator over Rademacher probes ``z`` (``E[z^T f(B) z] = tr f(B)``),
each ``z^T log(B) z ~= |z|^2 e_1^T log(T) e_1`` from ``steps`` Lanczos steps (``T`` tridiagonal;
Gauss quadrature, exact once the Krylov space is exhausted). The standard error reported is that
of the probe mean; the quadrature error decays like ``exp(-2 steps / sqrt(cond(B)))``. No
reorthogonalization: the quadrature is robust to its loss (Ubaru et al., sec. 4).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._checks import check_int
from .cg import observed_problem, progress_bar
from .grid import KroneckerGrid
from .ops import kron_mv


class LogdetEstimate(NamedTuple):
    """``value`` the estimate of ``log|A|`` (0-dim, the factors' dtype, no gradient);
    ``std_error`` the standard error over the probes; ``probes`` and ``steps`` used."""

    value: Tensor
    std_error: float
    probes: int
    steps: int


def _lanczos_quadrature(apply_B, Z: Tensor, steps: int, bar) -> Tensor:
    """``z^T log(B) z`` for every column ``z`` of ``Z (M, p)``: batched Lanczos, then Gauss
    quadrature from each column's tridiagonal matrix (per-column length at breakdown)."""
    M, p = Z.shape
    norms2 = (Z * Z).sum(0)
    q = Z / norms2.sqrt()
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(p, dtype=Z.dtype, device=Z.device)
    alphas, betas = [], []
    length = torch.full((p,), steps, dtype=torch.long, device=Z.device)
    active = torch.ones(p, dtype=torch.bool, device=Z.device)
    for j in range(steps):
        w = apply_B(q) - beta_prev * q_prev
        alpha = (w * q).sum(0)
        w = w - alpha * q
        beta = w.norm(dim=0)
        alphas.append(alpha)
        betas.append(beta)
        if bar is not None:
            bar.update(f"step {j + 1}")
        # Breakdown: the Krylov space of this probe is exhausted and its quadrature is exact.
        done = active & (beta <= 1e3 * torch.finfo(Z.dtype).eps * alpha.abs().clamp_min(1.0))
        length = torch.where(done, j + 1, length)
        active = active & ~done
        if not bool(active.any()):  # one host sync per step: stop once every probe has broken down
            break
        q_prev, q = q, torch.where(active, w / torch.where(active, beta, 1.0), 0.0)
        beta_prev = torch.where(active, beta, 0.0)
    alphas, betas = torch.stack(alphas).double().cpu(), torch.stack(betas).double().cpu()
    length = length.cpu()
    quad = torch.empty(p, dtype=torch.float64)
    for c in range(p):
        m = int(length[c])
        T = torch.diag(alphas[:m, c]) + torch.diag(betas[: m - 1, c], 1) + torch.diag(betas[: m - 1, c], -1)
        if not bool(torch.isfinite(T).all()):
            raise ValueError("incomplete_grid_logdet: Lanczos produced non-finite values; check the factors and noise for NaN or Inf")
        theta, U = torch.linalg.eigh(T)
        if float(theta.min()) <= 0:
            raise ValueError(f"incomplete_grid_logdet: the operator is not positive definite (Ritz value {float(theta.min()):.3g})")
        quad[c] = (U[0] ** 2 * theta.log()).sum()
    return quad * norms2.double().cpu()


def incomplete_grid_logdet(
    factors: Sequence[Tensor],
    noise: Union[float, Tensor],
    mask: Optional[Tensor] = None,
    *,
    probes: int = 16,
    steps: int = 40,
    seed: int = 0,
    progress: bool = False,
) -> LogdetEstimate:
    """Estimate of ``log|S^T K S + diag(noise)|`` by stochastic Lanczos quadrature (module docstring).

    Args:
        factors: symmetric PSD ``K_d (n_d, n_d)``, float32/float64, all on one device.
        noise: positive float, or ``(M,)`` per-observation noise variances.
        mask: optional bool ``(n_1 ... n_D,)`` of the ``M`` observed points; None: the whole grid.
        probes: Rademacher probe vectors (the standard error falls like ``1 / sqrt(probes)``).
        steps: Lanczos steps per probe (at most ``M`` are useful).
        seed: seed of the probes; the estimate is deterministic for a seed.
        progress: show a progress bar over the Lanczos steps.

    Returns:
        `LogdetEstimate`. The value carries no gradient (a stochastic estimate for monitoring and
        model comparison); full grids with one noise level have the exact `KroneckerGrid.logdet`.
    """
    fn = "incomplete_grid_logdet"
    if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)) or not factors or not isinstance(factors[0], Tensor):
        raise TypeError(f"{fn}: factors must be a non-empty list or tuple of square tensors, got {type(factors).__name__}")
    factors, index, noise = observed_problem(fn, factors, factors[0], noise, mask)
    check_int(fn, "probes", probes, low=1)
    check_int(fn, "steps", steps, low=1)
    factors = [f.detach() for f in factors]
    noise = noise.detach()
    M = noise.shape[0]
    dtype, device = factors[0].dtype, factors[0].device
    if M == 0:
        return LogdetEstimate(torch.zeros((), dtype=dtype, device=device), 0.0, probes, 0)
    if index is None:
        mean = float(noise.mean())
        with warnings.catch_warnings():  # P only preconditions; its conditioning does not bias the estimate
            warnings.simplefilter("ignore", RuntimeWarning)
            grid = KroneckerGrid(factors, mean)
        offset = grid.logdet().double()

        def apply_B(v: Tensor) -> Tensor:
            u = grid.inv_sqrt_mv(v)
            return v + grid.inv_sqrt_mv((noise - mean)[:, None] * u)
    else:
        diag_K = factors[0].diagonal()
        for f in factors[1:]:
            diag_K = torch.outer(diag_K, f.diagonal()).reshape(-1)
        d = diag_K[index] + noise
        if not bool((d > 0).all()):
            raise ValueError(f"{fn}: the operator is not positive definite (diagonal entry {float(d.min()):.3g}); the factors must be PSD")
        offset = d.double().log().sum()
        scale = d.rsqrt()[:, None]
        N = diag_K.shape[0]

        def apply_B(v: Tensor) -> Tensor:
            full = v.new_zeros((N, v.shape[1])).index_copy(0, index, scale * v)
            return scale * (kron_mv(factors, full).index_select(0, index) + noise[:, None] * (scale * v))

    gen = torch.Generator().manual_seed(seed)
    Z = (torch.randint(0, 2, (M, probes), generator=gen) * 2 - 1).to(dtype=dtype, device=device)
    steps = min(steps, M)
    bar = progress_bar(progress, steps, "slq")
    try:
        with torch.no_grad():
            quad = _lanczos_quadrature(apply_B, Z, steps, bar)
    finally:
        if bar is not None:
            bar.close()
    std_error = float(quad.std() / math.sqrt(probes)) if probes > 1 else float("nan")
    value = (offset.cpu() + quad.mean()).to(dtype=dtype, device=device)
    return LogdetEstimate(value, std_error, probes, steps)
