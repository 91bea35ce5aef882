"""Solve + log-det of ``K_1 (x) ... (x) K_D + noise I`` from scratch (factor eigendecompositions
included), and the MLL with its gradients, float64, RBF factors, noise 1e-2.

Providers:
  pyfast        pyfast.gp.KroneckerGrid(factors, noise): solve(y), logdet()
  torch-native  eigh per factor + rotating mode products (`grids.torch_solve_logdet`)
  gpytorch      KroneckerProductAddedDiagLinearOperator: solve(y), logdet()
Each output is checked against the torch-native one. Bytes moved: ``4 D N s`` (two Kronecker
matvecs, one read + one write of the vector per mode).
"""
import pytest
import torch

import pyfast
from grids import GRIDS, NOISE, gpytorch_operator, gpytorch_solve_logdet, need_gpytorch, setup, torch_solve_logdet

SUITE = "gp solve + logdet: K_1 x ... x K_D + noise I, float64"
MLL_SUITE = "gp MLL + gradients (factors, noise): K_1 x ... x K_D + noise I, float64"


def pyfast_solve_logdet(factors, noise, y):
    grid = pyfast.gp.KroneckerGrid(factors, noise)
    return grid.solve(y), grid.logdet()


PROVIDERS = {"pyfast": pyfast_solve_logdet, "torch-native": torch_solve_logdet, "gpytorch": gpytorch_solve_logdet}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("sizes", GRIDS)
def test_solve_logdet(measure, expect_close, device, sizes, provider):
    need_gpytorch(provider)
    factors, y = setup(sizes, device)
    ref = torch_solve_logdet(factors, NOISE, y)
    fn = PROVIDERS[provider]
    measure(
        lambda: fn(factors, NOISE, y),
        suite=SUITE,
        workload="x".join(map(str, sizes)),
        provider=provider,
        bytes_moved=4 * len(sizes) * y.numel() * 8,
        sizes={"grid": list(sizes), "B": 1, "dtype": "float64", "noise": NOISE},
        check=expect_close(ref, 1e-8, f"{provider} solve + logdet"),
    )


def _leaves(factors):
    return [K.clone().requires_grad_() for K in factors], torch.tensor(NOISE, dtype=torch.float64, device=factors[0].device, requires_grad=True)


def pyfast_mll_grads(factors, y):
    Ks, noise = _leaves(factors)
    mll = pyfast.gp.KroneckerGrid(Ks, noise).marginal_log_likelihood(y).sum()
    return (mll.detach(), *torch.autograd.grad(mll, [*Ks, noise]))


def gpytorch_mll_grads(factors, y):
    Ks, noise = _leaves(factors)
    N = y.shape[0]
    op = gpytorch_operator(Ks, noise)
    quad, logdet = op.inv_quad_logdet(y, logdet=True)
    mll = -0.5 * quad - 0.5 * logdet - 0.5 * N * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    return (mll.detach(), *torch.autograd.grad(mll, [*Ks, noise]))


MLL_PROVIDERS = {"pyfast": pyfast_mll_grads, "gpytorch": gpytorch_mll_grads}


@pytest.mark.parametrize("provider", list(MLL_PROVIDERS))
@pytest.mark.parametrize("sizes", GRIDS[:2])
def test_mll_gradients(measure, device, sizes, provider):
    need_gpytorch(provider)
    factors, y = setup(sizes, device)
    ref = pyfast_mll_grads(factors, y)[0]
    fn = MLL_PROVIDERS[provider]

    def check(out):
        # GPyTorch clamps eigenvalues inside its log-det; the values must still agree here
        # (noise 1e-2 keeps every eigenvalue of K + noise I far above its 1e-7 clamp).
        assert abs(float(out[0] - ref)) <= 1e-8 * abs(float(ref)), f"{provider} MLL {float(out[0])} != {float(ref)}"

    measure(
        lambda: fn(factors, y),
        suite=MLL_SUITE,
        workload="x".join(map(str, sizes)),
        provider=provider,
        bytes_moved=4 * len(sizes) * y.numel() * 8,
        sizes={"grid": list(sizes), "B": 1, "dtype": "float64", "noise": NOISE},
        check=check,
    )
