"""Solves on incomplete grids (observations on a subset, heteroscedastic noise) by preconditioned
conjugate gradients.

With ``S`` the ``(N, M)`` scatter of the ``M`` observed points into the grid,

    A = S^T (K_1 (x) ... (x) K_D) S + diag(noise),   noise > 0 per observation,

is applied by one `kron_mv` per iteration. The preconditioner is the exact inverse of the nearby
full-grid operator, ``M^{-1} = S^T (K + mean(noise) I)^{-1} S`` (a `KroneckerGrid` solve; SPD on
the observed subspace), exact when every point is observed with one noise level (then CG stops
after one iteration). Gradients use the adjoint solve: ``dL/dy = A^{-1} g`` and
``dL/dtheta = -(A^{-1} g)^T (dA/dtheta) x``, differentiated through `kron_mv`.

The log-determinant of ``A`` has no exact Kronecker formula; `pyfast.gp.incomplete_grid_logdet`
estimates it by stochastic Lanczos quadrature.
"""
from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._checks import check_tensor, value_checks_enabled
from . import ops
from .grid import KroneckerGrid
from .ops import kron_mv


class CGResult(NamedTuple):
    """``solution`` ``(M[, B])``; ``iterations`` run; ``residual`` the largest relative residual
    ``|y - A x| / |y|`` over the columns at exit; ``converged`` whether it reached ``tol``."""

    solution: Tensor
    iterations: int
    residual: float
    converged: bool


class _Problem:
    """The operator ``A``, its preconditioner and the observed-index bookkeeping."""

    def __init__(self, factors: List[Tensor], noise: Tensor, index: Optional[Tensor]):
        self.factors, self.noise, self.index = factors, noise, index
        self.stats = (0, 0.0)  # (iterations, relative residual) of the forward solve
        self.N = math.prod([f.shape[0] for f in factors])
        mean_noise = float(noise.detach().mean())
        with warnings.catch_warnings():  # conditioning of the preconditioner does not bias CG's answer
            warnings.simplefilter("ignore", RuntimeWarning)
            self.pre = KroneckerGrid([f.detach() for f in factors], mean_noise)

    def scatter(self, x: Tensor) -> Tensor:
        if self.index is None:
            return x
        full = x.new_zeros((self.N, x.shape[1]))
        return full.index_copy(0, self.index, x)

    def gather(self, x: Tensor) -> Tensor:
        return x if self.index is None else x.index_select(0, self.index)

    def matvec(self, x: Tensor, factors: Optional[List[Tensor]] = None, noise: Optional[Tensor] = None) -> Tensor:
        factors = self.factors if factors is None else factors
        noise = self.noise if noise is None else noise
        return self.gather(kron_mv(factors, self.scatter(x))) + noise[:, None] * x

    def precondition(self, r: Tensor) -> Tensor:
        return self.gather(self.pre.solve(self.scatter(r)))


def _pcg(problem: _Problem, b: Tensor, tol: float, max_iter: int, progress: bool):
    """Preconditioned CG on every column of ``b (M, B)`` at once (per-column step sizes)."""
    with torch.no_grad():
        x = torch.zeros_like(b)
        r = b.clone()
        b_norm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
        z = problem.precondition(r)
        p = z.clone()
        rz = (r * z).sum(0)
        residual = float((r.norm(dim=0) / b_norm).max()) if b.numel() else 0.0
        it = 0
        bar = progress_bar(progress, max_iter, "pcg")
        while residual > tol and it < max_iter:
            Ap = problem.matvec(p)
            alpha = rz / (p * Ap).sum(0)
            x += alpha * p
            r -= alpha * Ap
            it += 1
            residual = float((r.norm(dim=0) / b_norm).max())
            if bar is not None:
                bar.update(f"residual {residual:.2e}")
            if residual <= tol:
                break
            z = problem.precondition(r)
            rz_new = (r * z).sum(0)
            p = z + (rz_new / rz) * p
            rz = rz_new
        if bar is not None:
            bar.close()
    return x, it, residual


class _Bar:
    """A transient rich progress bar of ``total`` iterations named ``name``."""

    def __init__(self, total: int, name: str):
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._progress.start()
        self._name = name
        self._task = self._progress.add_task(name, total=total)

    def update(self, status: str) -> None:
        self._progress.update(self._task, advance=1, description=f"{self._name} {status}")

    def close(self) -> None:
        self._progress.stop()


def progress_bar(enabled: bool, total: int, name: str) -> Optional[_Bar]:
    return _Bar(total, name) if enabled else None


class _CGSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: _Problem, settings, y: Tensor, noise: Tensor, *factors: Tensor):
        x, it, residual = _pcg(problem, y, *settings)
        ctx.problem, ctx.settings = problem, settings
        problem.stats = (it, residual)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        problem = ctx.problem
        lam, _, _ = _pcg(problem, grad.contiguous(), *ctx.settings)
        wants = ctx.needs_input_grad
        grad_noise, grad_factors = None, [None] * len(problem.factors)
        if any(wants[3:]):
            with torch.enable_grad():
                noise = problem.noise.detach().requires_grad_()
                factors = [f.detach().requires_grad_() for f in problem.factors]
                surrogate = -(lam * problem.matvec(x, factors, noise)).sum()
                grads = torch.autograd.grad(surrogate, [noise, *factors])
            grad_noise, grad_factors = grads[0], list(grads[1:])
        return (None, None, lam if wants[2] else None, grad_noise, *grad_factors)


def observed_problem(fn: str, factors, like: Tensor, noise, mask: Optional[Tensor]):
    """Validated ``(factors, index, noise)``: the factors (``like``'s dtype and device), the
    observed grid indices (None: the whole grid) and the ``(M,)`` per-observation noise."""
    factors = ops.check_factors(fn, factors, like, square=True)
    N = math.prod([f.shape[0] for f in factors])
    index = None
    if mask is not None:
        check_tensor(fn, "mask", mask, ndim=1, dims=f"({N},)", dtypes=(torch.bool,))
        if mask.shape[0] != N or mask.device != like.device:
            raise ValueError(f"{fn}: mask must have shape ({N},) (the grid) on {like.device}, got {tuple(mask.shape)} on {mask.device}")
        index = mask.nonzero().squeeze(1)
    M = N if index is None else index.shape[0]
    if isinstance(noise, Tensor):
        check_tensor(fn, "noise", noise, dtypes=(like.dtype,))
        if noise.numel() == 1:
            noise = noise.reshape(1).expand(M)
        elif tuple(noise.shape) != (M,):
            raise ValueError(f"{fn}: noise must be a scalar or have shape ({M},) (one per observation), got {tuple(noise.shape)}")
    elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
        noise = torch.full((M,), float(noise), dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"{fn}: noise must be a float or a tensor, got {type(noise).__name__}")
    if value_checks_enabled() and M and not bool((noise.detach() > 0).all() & torch.isfinite(noise.detach()).all()):
        raise ValueError(f"{fn}: noise must be positive and finite, got min {float(noise.detach().min())}")
    return factors, index, noise


def incomplete_grid_solve(
    factors: Sequence[Tensor],
    y: Tensor,
    noise: Union[float, Tensor],
    mask: Optional[Tensor] = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
    progress: bool = False,
) -> CGResult:
    """``(S^T K S + diag(noise))^{-1} y`` by preconditioned CG.

    Args:
        factors: symmetric PSD ``K_d (n_d, n_d)`` (float32/float64); may require grad.
        y: ``(M,)`` or ``(M, B)`` values at the observed points, in grid (row-major) order.
        noise: positive float, or ``(M,)`` per-observation noise variances (may require grad).
        mask: optional bool ``(n_1 ... n_D,)``: which grid points are observed (``M`` of them);
            None observes the whole grid.
        tol: stop when every column's relative residual ``|y - A x| / |y|`` is ``<= tol``.
        max_iter: iteration cap (the result says whether it converged).
        progress: show a progress bar with the residual.

    Returns:
        `CGResult` (solution differentiable w.r.t. ``y``, ``noise`` and the factors).
    """
    fn = "incomplete_grid_solve"
    check_tensor(fn, "y", y, dtypes=(torch.float32, torch.float64))
    factors, index, noise = observed_problem(fn, factors, y, noise, mask)
    ops.check_grid_vector(fn, "y", y, noise.shape[0], "one row per observed grid point")
    if not (isinstance(tol, float) and tol > 0):
        raise ValueError(f"{fn}: tol must be a positive float, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be a positive int, got {max_iter!r}")
    problem = _Problem(factors, noise, index)
    x = _CGSolve.apply(problem, (tol, max_iter, progress), ops._as_matrix(y), noise, *factors)
    it, residual = problem.stats
    return CGResult(x.squeeze(1) if y.dim() == 1 else x, it, residual, residual <= tol)
