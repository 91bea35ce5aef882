"""KroneckerGrid against dense float64 solves: values and every gradient, both diagonals."""
import warnings

import pytest
import torch

import pyfast
from pyfast.gp import KroneckerGrid, reference as R
from kernel_cases import assert_as_accurate_as_reference, assert_close, rel_error

GRIDS = [(5,), (4, 3), (1, 6), (4, 3, 5), (2, 3, 2, 2)]


def _problem(sizes, dtype, kron_diag: bool, cols):
    """RBF factors on random inputs with leaf lengthscales, noise, optional diagonals and y."""
    xs = [torch.rand(n, dtype=torch.float64) for n in sizes]
    ls = [torch.tensor(0.2 + 0.1 * d, dtype=torch.float64, requires_grad=True) for d in range(len(sizes))]
    noise = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    diags = [(torch.rand(n, dtype=torch.float64) + 0.5).requires_grad_() for n in sizes] if kron_diag else None
    N = 1
    for n in sizes:
        N *= n
    y = torch.randn(N, *(() if cols is None else (cols,)), dtype=torch.float64, requires_grad=True)
    return xs, ls, noise, diags, y


def _loss(factors, noise, y, diags, use_grid: bool):
    """A scalar touching every output: MLL, the solve and the log-det."""
    if use_grid:
        g = KroneckerGrid(factors, noise, diags)
        mll, alpha, ld = g.marginal_log_likelihood(y), g.solve(y), g.logdet()
    else:
        mll, alpha = R.marginal_log_likelihood(factors, noise, y, diags), R.solve(factors, noise, y, diags)
        ld = R.logdet(factors, noise, diags)
    return mll, alpha, ld


@pytest.mark.parametrize("sizes", GRIDS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kron_diag", [False, True], ids=["noise-I", "noise-kron-diag"])
@pytest.mark.parametrize("cols", [None, 3])
def test_grid_matches_dense_float64(sizes, kron_diag, cols):
    xs, ls, noise, diags, y = _problem(sizes, torch.float64, kron_diag, cols)
    leaves = [*ls, noise, y] + (diags or [])
    results = []
    for use_grid in (True, False):
        factors = [R.rbf(x, x, l) for x, l in zip(xs, ls)]
        mll, alpha, ld = _loss(factors, noise, y, diags, use_grid)
        w = torch.randn(alpha.shape, dtype=alpha.dtype, generator=torch.Generator().manual_seed(1))
        total = mll.sum() + (w * alpha).sum() + 0.3 * ld
        results.append((mll, alpha, ld, torch.autograd.grad(total, leaves)))
    (mll, alpha, ld, grads), (mll_r, alpha_r, ld_r, grads_r) = results
    assert_close(mll, mll_r, torch.float64, "mll")
    assert_close(alpha, alpha_r, torch.float64, "solve")
    assert_close(ld, ld_r, torch.float64, "logdet")
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        assert_close(g, gr, torch.float64, f"grad of leaf {i}")


def test_factor_matrix_gradients_gradcheck():
    """Gradients w.r.t. the factor matrices themselves (symmetrized inputs) by finite differences."""
    A = torch.randn(4, 4, dtype=torch.float64)
    B = torch.randn(3, 3, dtype=torch.float64)
    K1 = (A @ A.t() + torch.eye(4, dtype=torch.float64)).requires_grad_()
    K2 = (B @ B.t() + torch.eye(3, dtype=torch.float64)).requires_grad_()
    y = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    d1 = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    d2 = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()

    def f(K1, K2, noise, y, d1, d2):
        sym = [(K1 + K1.t()) / 2, (K2 + K2.t()) / 2]
        return KroneckerGrid(sym, noise, [d1, d2]).marginal_log_likelihood(y)

    assert torch.autograd.gradcheck(f, (K1, K2, noise, y, d1, d2))


@pytest.mark.parametrize("kron_diag", [False, True])
def test_grid_float32(kron_diag):
    """float32: the eigendecompositions run in float64, the mode products in float32; results are
    at least as accurate as a dense float32 Cholesky (factor 2, DESIGN.md rule)."""
    xs, ls, noise, diags, y = _problem((6, 5, 7), torch.float64, kron_diag, 2)
    f64 = [R.rbf(x, x, l).detach() for x, l in zip(xs, ls)]
    d64 = None if diags is None else [d.detach() for d in diags]
    y64 = y.detach()
    f32, d32, y32 = [f.float() for f in f64], None if d64 is None else [d.float() for d in d64], y64.float()
    g = KroneckerGrid(f32, 0.05, d32)
    assert g.solve(y32).dtype == torch.float32
    for name, got, want, low in [
        ("solve", g.solve(y32), R.solve(f64, 0.05, y64, d64), R.solve(f32, 0.05, y32, d32)),
        ("logdet", g.logdet(), R.logdet(f64, 0.05, d64), R.logdet(f32, 0.05, d32)),
        ("mll", g.marginal_log_likelihood(y32), R.marginal_log_likelihood(f64, 0.05, y64, d64),
         R.marginal_log_likelihood(f32, 0.05, y32, d32)),
    ]:
        assert_as_accurate_as_reference(got, want, low, torch.float32, name)


def test_jitter_is_exact_for_the_jittered_operator():
    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    K = R.rbf(x, x, 1.0)  # smallest eigenvalue at rounding level
    with pytest.warns(RuntimeWarning, match=r"numerically singular factors\[0\] .* jitter 0"):
        KroneckerGrid([K, K], 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # noise regularizes the singular factors: no warning
        KroneckerGrid([K, K], 1e-3)
    y = torch.randn(144, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = KroneckerGrid([K, K], 1e-3, jitter=1e-6)
    Kj = K + 1e-6 * torch.eye(12, dtype=torch.float64)
    # cond(A) ~ 1e4 here, so both solvers carry ~1e-12 relative rounding error.
    assert rel_error(g.solve(y), R.solve([Kj, Kj], 1e-3, y)) < 1e-10
    assert rel_error(g.logdet(), R.logdet([Kj, Kj], 1e-3)) < 1e-12


def test_indefinite_factor_is_an_error():
    K = torch.diag(torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"factors\[1\] is not positive semi-definite .* jitter > 0.2"):
        KroneckerGrid([torch.eye(2, dtype=torch.float64), K], 0.1)


def test_reference_backend():
    xs, ls, noise, _, y = _problem((3, 4), torch.float64, False, None)
    factors = [R.rbf(x, x, l).detach() for x, l in zip(xs, ls)]
    with pyfast.use_backend("reference"):
        out = KroneckerGrid(factors, 0.1).solve(y.detach())
    assert_close(out, R.solve(factors, 0.1, y.detach()), torch.float64, "reference backend")


def test_grid_bad_inputs():
    K = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="KroneckerGrid: noise must be positive and finite, got 0.0"):
        KroneckerGrid([K], 0.0)
    with pytest.raises(ValueError, match="KroneckerGrid: noise must be positive and finite, got -1"):
        KroneckerGrid([K], torch.tensor(-1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"KroneckerGrid: factors\[1\] must be square"):
        KroneckerGrid([K, torch.ones(2, 3, dtype=torch.float64)], 0.1)
    with pytest.raises(ValueError, match=r"KroneckerGrid: factors\[0\] must be symmetric"):
        KroneckerGrid([torch.triu(torch.ones(3, 3, dtype=torch.float64))], 0.1)
    with pytest.raises(ValueError, match=r"KroneckerGrid: diagonals\[0\] must be positive and finite"):
        KroneckerGrid([K], 0.1, [torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"KroneckerGrid: diagonals\[0\] must have shape \(3,\)"):
        KroneckerGrid([K], 0.1, [torch.ones(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="KroneckerGrid: jitter must be a float >= 0"):
        KroneckerGrid([K], 0.1, jitter=-1.0)
    g = KroneckerGrid([K, K], 0.1)
    with pytest.raises(ValueError, match=r"KroneckerGrid.solve: y must have shape \(9,\) or \(9, B\)"):
        g.solve(torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="KroneckerGrid.solve: y must be torch.float64"):
        g.solve(torch.ones(9))
