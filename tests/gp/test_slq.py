"""Stochastic Lanczos quadrature log-det on incomplete grids against a dense log-det."""
import math

import pytest
import torch

from pyfast.gp import KroneckerGrid, incomplete_grid_logdet, reference as R


def _factors(sizes, lengthscale=0.3):
    gen = torch.Generator().manual_seed(1)
    return [R.rbf(x, x, lengthscale) for x in (torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes)]


def _dense_logdet(factors, noise, mask):
    K = R.kron(factors)
    if mask is not None:
        K = K[mask][:, mask]
    return float(torch.logdet(K + torch.diag(noise.expand(K.shape[0]))))


@pytest.mark.parametrize("sizes,frac,hetero", [((23,), 0.6, True), ((5, 7), 0.7, False), ((4, 3, 5), 0.5, True), ((6, 7), 1.0, True)])
def test_estimate_within_its_standard_error(sizes, frac, hetero):
    gen = torch.Generator().manual_seed(2)
    factors = _factors(sizes)
    N = math.prod(sizes)
    mask = torch.rand(N, generator=gen) < frac if frac < 1 else None
    M = N if mask is None else int(mask.sum())
    noise = 0.05 + 0.1 * torch.rand(M, generator=gen, dtype=torch.float64) if hetero else torch.tensor(0.05, dtype=torch.float64)
    exact = _dense_logdet(factors, noise, mask)
    est = incomplete_grid_logdet(factors, noise, mask, probes=64, steps=M)
    assert est.steps == M and est.probes == 64 and est.std_error > 0
    # Lanczos is exact at steps = M: the only error is the probe mean's.
    assert abs(float(est.value) - exact) <= 4 * est.std_error + 1e-8 * abs(exact)
    assert est.std_error < 0.1 * abs(exact)


def test_one_noise_level_on_the_full_grid_is_exact():
    factors = _factors((6, 5, 4))
    est = incomplete_grid_logdet(factors, 0.03, steps=5)
    exact = float(KroneckerGrid(factors, 0.03).logdet())
    assert abs(float(est.value) - exact) <= 1e-10 * abs(exact)
    assert est.std_error <= 1e-10 * abs(exact)


def test_few_steps_converge_with_the_kronecker_preconditioner():
    gen = torch.Generator().manual_seed(3)
    factors = _factors((9, 8))
    noise = 0.05 * (1 + 0.2 * torch.rand(72, generator=gen, dtype=torch.float64))
    exact = _dense_logdet(factors, noise, None)
    est = incomplete_grid_logdet(factors, noise, probes=64, steps=8)
    assert abs(float(est.value) - exact) <= 4 * est.std_error + 1e-6 * abs(exact)


def test_deterministic_for_a_seed_and_float32():
    factors = _factors((5, 6))
    mask = torch.arange(30) % 4 != 0
    a = incomplete_grid_logdet(factors, 0.1, mask, seed=7)
    b = incomplete_grid_logdet(factors, 0.1, mask, seed=7)
    assert torch.equal(a.value, b.value)
    f32 = incomplete_grid_logdet([f.float() for f in factors], 0.1, mask, seed=7)
    assert f32.value.dtype == torch.float32
    assert abs(float(f32.value) - float(a.value)) <= 1e-4 * abs(float(a.value))


def test_empty_mask_and_bad_inputs():
    factors = _factors((3, 4))
    est = incomplete_grid_logdet(factors, 0.1, torch.zeros(12, dtype=torch.bool))
    assert float(est.value) == 0.0
    with pytest.raises(ValueError, match="incomplete_grid_logdet: probes must be in \\[1, inf\\], got 0"):
        incomplete_grid_logdet(factors, 0.1, probes=0)
    with pytest.raises(ValueError, match="incomplete_grid_logdet: noise must be positive and finite"):
        incomplete_grid_logdet(factors, -0.1)
    with pytest.raises(ValueError, match=r"incomplete_grid_logdet: mask must have shape \(12,\)"):
        incomplete_grid_logdet(factors, 0.1, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="incomplete_grid_logdet: factors must be a non-empty list"):
        incomplete_grid_logdet(factors[0], 0.1)
    with pytest.raises(ValueError, match="incomplete_grid_logdet: the operator is not positive definite \\(diagonal entry -0.9"):
        incomplete_grid_logdet([-torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)], 0.1, torch.arange(12) < 9)


def test_indefinite_factor_on_the_full_grid_is_named():
    K = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"factors\[0\] is not positive semi-definite \(smallest eigenvalue -0.5"):
        incomplete_grid_logdet([K, torch.eye(4, dtype=torch.float64)], torch.full((12,), 0.1, dtype=torch.float64).add_(torch.arange(12) * 0.01))


def test_inverse_square_root_of_the_grid():
    factors = _factors((4, 5))
    grid = KroneckerGrid(factors, 0.07)
    v = torch.randn(20, 3, dtype=torch.float64)
    A = R.kron(factors) + 0.07 * torch.eye(20, dtype=torch.float64)
    lam, Q = torch.linalg.eigh(A)
    torch.testing.assert_close(grid.inv_sqrt_mv(v), Q @ (lam.rsqrt()[:, None] * (Q.T @ v)))
    with pytest.raises(ValueError, match="inv_sqrt_mv: the symmetric root needs D = I"):
        KroneckerGrid(factors, 0.07, [torch.ones(4, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]).inv_sqrt_mv(v)
