"""Incomplete-grid PCG against a dense solve: values, gradients, iterations, residual."""
import math

import pytest
import torch

from pyfast.gp import incomplete_grid_solve, reference as R


def _setup(sizes, frac, hetero, cols):
    xs = [torch.rand(n, dtype=torch.float64) for n in sizes]
    ls = [torch.tensor(0.3, dtype=torch.float64, requires_grad=True) for _ in sizes]
    N = math.prod(sizes)
    mask = torch.rand(N) < frac if frac < 1 else None
    M = N if mask is None else int(mask.sum())
    noise = (0.05 + 0.1 * torch.rand(M, dtype=torch.float64) if hetero else torch.full((1,), 0.05, dtype=torch.float64)).requires_grad_()
    y = torch.randn(M, *(() if cols is None else (cols,)), dtype=torch.float64, requires_grad=True)
    return xs, ls, mask, noise, y


def _dense(factors, noise, y, mask):
    K = R.kron(factors)
    if mask is not None:
        K = K[mask][:, mask]
    A = K + torch.diag(noise.expand(K.shape[0]))
    return torch.linalg.solve(A, y)


@pytest.mark.parametrize("sizes,frac,hetero,cols", [
    ((7,), 0.6, True, None), ((5, 6), 0.7, False, 2), ((4, 3, 5), 0.5, True, None), ((6, 7), 1.0, True, 3),
])
def test_cg_matches_dense(sizes, frac, hetero, cols):
    xs, ls, mask, noise, y = _setup(sizes, frac, hetero, cols)
    leaves = [*ls, noise, y]
    res = incomplete_grid_solve([R.rbf(x, x, l) for x, l in zip(xs, ls)], y, noise, mask, tol=1e-12)
    assert res.converged and res.residual <= 1e-12 and res.iterations >= 1
    ref = _dense([R.rbf(x, x, l) for x, l in zip(xs, ls)], noise, y, mask)
    assert float((res.solution - ref).detach().norm() / ref.detach().norm()) < 1e-9
    w = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad((w * res.solution).sum(), leaves)
    want = torch.autograd.grad((w * ref).sum(), leaves)
    for g, r in zip(got, want):
        assert float((g - r).norm() / r.norm()) < 1e-8


def test_preconditioner_is_exact_on_full_grid():
    xs, ls, _, _, y = _setup((5, 4), 1.0, False, None)
    res = incomplete_grid_solve([R.rbf(x, x, 0.3) for x in xs], y.detach(), 0.05)
    assert res.iterations == 1 and res.converged


def test_cg_reports_non_convergence():
    xs, _, mask, noise, y = _setup((9, 9), 0.5, True, None)
    res = incomplete_grid_solve([R.rbf(x, x, 0.3) for x in xs], y.detach(), noise.detach(), mask, tol=1e-14, max_iter=2)
    assert res.iterations == 2 and not res.converged and res.residual > 1e-14


def test_cg_bad_inputs():
    K = torch.eye(3, dtype=torch.float64)
    y = torch.randn(9, dtype=torch.float64)
    with pytest.raises(ValueError, match="incomplete_grid_solve: noise must be positive and finite"):
        incomplete_grid_solve([K, K], y, 0.0)
    with pytest.raises(ValueError, match=r"incomplete_grid_solve: mask must have shape \(9,\)"):
        incomplete_grid_solve([K, K], y, 0.1, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"incomplete_grid_solve: y must have shape \(4,\) or \(4, B\)"):
        incomplete_grid_solve([K, K], y, 0.1, torch.arange(9) < 4)
    with pytest.raises(ValueError, match=r"incomplete_grid_solve: noise must be a scalar or have shape \(9,\)"):
        incomplete_grid_solve([K, K], y, torch.ones(3, dtype=torch.float64))
