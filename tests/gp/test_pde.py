"""GP-HM solver pieces against dense float64 computations (`pyfast.gp.reference`), plus accuracy."""
import math

import pytest
import torch

from pyfast.gp import reference as R
from pyfast.gp.pde import GPHMSolver
from pyfast.gp.pde.problems import PROBLEMS, ExactDerivatives

F64 = torch.float64


def _tiny_solver(sizes=(7, 6), operator=None, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.sort(torch.rand(n, generator=gen, dtype=F64) * 2)[0] + 0.05 * torch.arange(n, dtype=F64) for n in sizes]
    op = operator or (lambda u, d, c: d.laplacian() + 0.3 * d.x(0))
    source = torch.randn(*sizes, generator=gen, dtype=F64)
    boundary = torch.randn(*sizes, generator=gen, dtype=F64)
    s = GPHMSolver(op, axes, source, boundary, num_components=3, kernel=kwargs.pop("kernel", "sm_gauss"), jitter=1e-3, **kwargs)
    with torch.no_grad():
        for m in s.mixtures:
            m.log_weights.copy_(torch.randn(3, generator=gen, dtype=F64) * 0.3)
            m.log_lengthscales.fill_(math.log(0.8))
            m.means.copy_(torch.rand(3, generator=gen, dtype=F64) * 0.5)
        s.U.copy_(torch.randn(s.N, generator=gen, dtype=F64))
        s.log_tau_b.fill_(0.4)
        s.log_tau_r.fill_(-0.2)
    return s


def _dense_loss(s: GPHMSolver, U):
    """The GP-HM negative log joint with the covariance and derivative operators built densely."""
    ops = s.axis_operators()
    C = R.kron([o.K for o in ops])
    N = C.shape[0]
    L = torch.linalg.cholesky(C)
    quad = (U * torch.cholesky_solve(U[:, None], L)[:, 0]).sum()
    nlp = 0.5 * quad + torch.log(torch.diagonal(L)).sum() + 0.5 * N * math.log(2 * math.pi)
    eye = [torch.eye(n, dtype=F64) for n in s.sizes]
    lap = sum(R.kron([o.D2 if a == b else eye[a] for a, o in enumerate(ops)]) for b in range(len(ops)))
    dx = R.kron([ops[0].D1] + eye[1:])
    r = ((lap + 0.3 * dx) @ U - s.source)[s.interior]
    gap = U[s.boundary_index] - s.g
    tb, tr = s.log_tau_b.exp(), s.log_tau_r.exp()
    boundary = 0.5 * tb * (gap * gap).sum() - 0.5 * gap.numel() * s.log_tau_b
    equation = 0.5 * tr * (r * r).sum() - 0.5 * r.numel() * s.log_tau_r
    return nlp + s.boundary_weight * boundary + equation


def test_objective_and_gradients_match_dense():
    s = _tiny_solver()
    params = [p for _, p in s.named_parameters()]
    ours = s.loss()
    g_ours = torch.autograd.grad(ours, params)
    dense = _dense_loss(s, s.U)
    g_dense = torch.autograd.grad(dense, params)
    assert abs(float(ours - dense)) <= 1e-9 * abs(float(dense))
    for a, b in zip(g_ours, g_dense):
        assert float((a - b).norm()) <= 1e-7 * max(float(b.norm()), 1.0)


@pytest.mark.parametrize("component", ["sm_gauss", "matern52"])
def test_derivative_operators_match_analytic(component):
    x = torch.linspace(0, 1, 41, dtype=F64)
    y = torch.linspace(0, 1.2, 37, dtype=F64)
    fn = lambda a, b: torch.sin(3 * a + 1) * torch.cos(2 * b) + a * a  # noqa: E731
    s = GPHMSolver(lambda u, d, c: d.laplacian(), [x, y], torch.zeros(41, 37, dtype=F64), torch.zeros(41, 37, dtype=F64),
                   kernel=component, num_components=1, jitter=1e-12)
    with torch.no_grad():
        for m in s.mixtures:
            m.means.zero_()
            m.log_lengthscales.fill_(math.log(1.0 if component == "sm_gauss" else 3.0))
    coords = torch.meshgrid(x, y, indexing="ij")
    exact = ExactDerivatives(fn, coords)
    ops = s.axis_operators()
    d = s.derivatives(exact.u.detach().reshape(-1), ops)
    inner = (slice(4, -4), slice(4, -4))  # kernel interpolation is least accurate at the edges
    tol = 5e-5 if component == "sm_gauss" else 2e-3
    for ours, truth in ((d.x(0), exact.x(0)), (d.x(1), exact.x(1)), (d.xx(0), exact.xx(0)), (d.xy(0, 1), exact.xy(0, 1)),
                        (d.laplacian(), exact.laplacian())):
        truth = truth.detach()
        assert float((ours - truth)[inner].norm() / truth[inner].norm()) <= tol
    # The mode products equal the dense Kronecker operators exactly.
    dense = R.kron([ops[0].D1, ops[1].D1]) @ exact.u.detach().reshape(-1)
    assert torch.allclose(d.xy(0, 1).reshape(-1), dense, rtol=1e-12, atol=1e-10)


def test_predict_matches_dense_posterior_mean():
    s = _tiny_solver(sizes=(5, 4, 3), operator=lambda u, d, c: d.laplacian())
    tests = [torch.linspace(0, 2, m, dtype=F64) for m in (6, 2, 5)]
    ours = s.predict(tests)
    ops = s.axis_operators()
    cross = R.kron([m.cross(t, x) for m, t, x in zip(s.mixtures, tests, s.axes)])
    dense = cross @ torch.linalg.solve(R.kron([o.K for o in ops]), s.U.detach())
    assert float((ours.reshape(-1) - dense).norm()) <= 1e-9 * float(dense.norm())


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_inner_solve_is_the_exact_minimizer(method):
    s = _tiny_solver()
    s.solve_values(method=method, tol=1e-12)
    ops = s.axis_operators()
    # Dense normal equations with C^{-1}: (C^{-1} + beta_b B^T B + beta_r A^T A) U = rhs.
    C = R.kron([o.K.detach() for o in ops])
    eye = [torch.eye(n, dtype=F64) for n in s.sizes]
    A = (sum(R.kron([o.D2.detach() if a == b else eye[a] for a, o in enumerate(ops)]) for b in range(2))
         + 0.3 * R.kron([ops[0].D1.detach(), eye[1]]))[s.interior]
    B = torch.eye(s.N, dtype=F64)[s.boundary_index]
    bb = s.boundary_weight * float(s.log_tau_b.exp())
    br = float(s.log_tau_r.exp())
    H = torch.linalg.inv(C) + bb * B.T @ B + br * A.T @ A
    U = torch.linalg.solve(H, bb * B.T @ s.g + br * A.T @ s.source[s.interior])
    assert float((s.U.detach() - U).norm()) <= 1e-6 * float(U.norm())


def test_newton_solve_of_a_nonlinear_pde_is_stationary():
    s = _tiny_solver(operator=lambda u, d, c: d.laplacian() + u * (u * u - 1))
    s.solve_values(method="dense")
    grad = torch.autograd.grad(s.loss(), s.U)[0]
    # The gradient is tiny next to the gradient at a perturbed point.
    with torch.no_grad():
        s.U.add_(0.01)
    grad_off = torch.autograd.grad(s.loss(), s.U)[0]
    assert float(grad.norm()) <= 1e-4 * float(grad_off.norm())


def test_paper_schedule_adam_decreases_the_objective():
    s = _tiny_solver(sizes=(6, 5))
    before = float(s.loss())
    history = s.fit(30, schedule="adam", lr=1e-2, progress=False, log_every=10)
    assert history.steps == [10, 20, 30]
    assert history.loss[-1] < before


def test_poisson1d_four_points_per_wavelength_reaches_1e3():
    """The 1-D accuracy claim at CI cost: sin(20x) on [0, 2 pi] with 80 points has the 4 points per
    wavelength of the paper's sin(100x) on 400 (that one: bench/gp/pde_accuracy.py)."""
    x = torch.linspace(0, 2 * math.pi, 80, dtype=F64)
    s = GPHMSolver(lambda u, d, c: d.xx(0), [x], lambda x: -400 * torch.sin(20 * x), lambda x: torch.sin(20 * x))
    s.fit(progress=False)
    test = torch.linspace(0, 2 * math.pi, 121, dtype=F64)
    truth = torch.sin(20 * test)
    assert float((s.predict([test]) - truth).norm() / truth.norm()) <= 1e-3


def test_poisson2d_small_grid_is_accurate():
    """The 2-D pipeline (spectral fit per axis, exact solve, prediction) on a 32 x 32 grid at CI cost.
    A domain holding one or two periods limits the periodogram fit (measured 1.3e-3); the 1e-3
    claim on the paper's 200^2 problem (measured 2e-5) is in bench/gp/pde_accuracy.md."""
    u = lambda x, y: torch.sin(2 * x) * torch.cos(3 * y)  # noqa: E731
    axes = [torch.linspace(0, 2 * math.pi, 32, dtype=F64)] * 2
    coords = torch.meshgrid(*axes, indexing="ij")
    source = ExactDerivatives(u, coords).laplacian().detach()
    s = GPHMSolver(lambda u, d, c: d.laplacian(), axes, source, u, boundary_weight=1e4)
    s.fit(progress=False)
    test = [torch.linspace(0, 2 * math.pi, 49, dtype=F64)] * 2
    truth = u(*torch.meshgrid(*test, indexing="ij"))
    assert float((s.predict(test) - truth).norm() / truth.norm()) <= 3e-3


def _laplacian_of_sin6cos20(x):  # d^2/dx^2 [sin(6x) cos(20x)] = d^2/dx^2 [(sin(26x) - sin(14x)) / 2]
    return 0.5 * (-676 * torch.sin(26 * x) + 196 * torch.sin(14 * x))


HAND_SOURCES = {
    "poisson1d_sin100": lambda x: -1e4 * torch.sin(100 * x),
    "poisson1d_xsin200": lambda x: 400 * torch.cos(200 * x) - 4e4 * x * torch.sin(200 * x),
    "poisson1d_sin500_quadratic": lambda x: -2.5e5 * torch.sin(500 * x) - 4,
    "allen_cahn1d_sin100": lambda x: -1e4 * torch.sin(100 * x) + torch.sin(100 * x) * (torch.sin(100 * x) ** 2 - 1),
    "poisson2d_sin100": lambda x, y: -2e4 * torch.sin(100 * x) * torch.sin(100 * y),
    "poisson2d_sin6cos20": lambda x, y: _laplacian_of_sin6cos20(x) + _laplacian_of_sin6cos20(y),
    "advection_beta200": lambda x, t: torch.zeros_like(x),
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problem_sources(name):
    problem = PROBLEMS[name]
    axes = problem.axes([11] * problem.dim)
    coords = torch.meshgrid(*axes, indexing="ij")
    f = problem.source(*coords)
    assert f.shape == tuple([11] * problem.dim) and bool(torch.isfinite(f).all())
    if name in HAND_SOURCES:
        expected = HAND_SOURCES[name](*coords)
        assert float((f - expected).norm()) <= 1e-10 * max(float(expected.norm()), 1.0)


def test_bad_inputs():
    x = torch.linspace(0, 1, 8, dtype=F64)
    op = lambda u, d, c: d.xx(0)  # noqa: E731
    z = torch.zeros(8, dtype=F64)
    with pytest.raises(TypeError, match="axes must be a list"):
        GPHMSolver(op, x, z, z)
    with pytest.raises(ValueError, match=r"axes\[0\] must be 1-D"):
        GPHMSolver(op, [torch.zeros(3, 3, dtype=F64)], z, z)
    with pytest.raises(ValueError, match=r"axes\[0\] must be finite and strictly increasing"):
        GPHMSolver(op, [x.flip(0)], z, z)
    with pytest.raises(ValueError, match="source must have the grid's shape"):
        GPHMSolver(op, [x], torch.zeros(7, dtype=F64), z)
    with pytest.raises(ValueError, match="source must be finite"):
        GPHMSolver(op, [x], torch.full((8,), float("nan"), dtype=F64), z)
    with pytest.raises(ValueError, match="jitter must be a positive"):
        GPHMSolver(op, [x], z, z, jitter=0.0)
    with pytest.raises(ValueError, match="boundary_weight must be a positive"):
        GPHMSolver(op, [x], z, z, boundary_weight=-1.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        GPHMSolver(op, [x], z, z, kernel="rbf")
    with pytest.raises(TypeError, match="axes must be a list of 1 to 3"):
        GPHMSolver(op, [x] * 4, torch.zeros([8] * 4, dtype=F64), torch.zeros([8] * 4, dtype=F64))
    bad = GPHMSolver(lambda u, d, c: d.xx(0)[:-1], [x], z, z)
    with pytest.raises(ValueError, match="operator must return a tensor of the grid's shape"):
        bad.loss()
    s = GPHMSolver(op, [x], z, z)
    with pytest.raises(ValueError, match="axis must be an int"):
        s.derivatives(s.U, s.axis_operators()).xx(1)
    with pytest.raises(ValueError, match="lengthscales must be positive"):
        with torch.no_grad():
            s.mixtures[0].log_lengthscales.fill_(float("-inf"))
        s.loss()


def test_demo_names_the_missing_plot_dependency(monkeypatch):
    from pyfast.gp.pde import demo

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"pyfast-kernels\[demo\]"):
        demo.run("unused.png", "cpu")
