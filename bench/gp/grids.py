"""Shared workloads of the pyfast.gp benchmarks: RBF factors on regular grids, right-hand sides,
and the competing implementations (plain torch, GPyTorch / linear_operator when installed).

Grids: 64^3 (N = 262144), 1024^2 (N = 1048576), 200^3 (N = 8e6, marked large); float64.
"""
import functools
import importlib.util
import math
from typing import List, Sequence

import pytest
import torch

from pyfast.gp import reference

GRIDS = [
    pytest.param((64, 64, 64), id="64^3"),
    pytest.param((1024, 1024), id="1024^2"),
    pytest.param((200, 200, 200), id="200^3", marks=pytest.mark.large),
]
NOISE = 1e-2
HAS_GPYTORCH = importlib.util.find_spec("linear_operator") is not None


@functools.lru_cache(maxsize=1)
def setup(sizes: Sequence[int], device: torch.device, cols: int = 1):
    """``(factors, y)``: RBF factors (lengthscale 0.2 on [0, 1]) and ``y (N, cols)``, float64."""
    gen = torch.Generator().manual_seed(0)
    factors = [reference.rbf(x, x, 0.2).to(device) for x in (torch.linspace(0, 1, n, dtype=torch.float64) for n in sizes)]
    y = torch.randn(math.prod(sizes), cols, generator=gen, dtype=torch.float64).to(device)
    return factors, y


def torch_kron_mv(factors: List[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """The usual plain-torch Kronecker matvec: multiply the leading mode, then rotate it to the
    back with a transpose copy (one copy per mode)."""
    cols = v.shape[1]
    x = v
    for K in factors:
        n = K.shape[0]
        x = (K @ x.reshape(n, -1)).reshape(n, -1, cols).transpose(0, 1).reshape(-1, cols)
    return x


def torch_solve_logdet(factors: List[torch.Tensor], noise: float, y: torch.Tensor):
    """Plain torch: ``eigh`` of every factor, then ``Q diag(1 / (lam + noise)) Q^T y`` with the
    rotating mode products above; the log-det from the Kronecker eigenvalues."""
    eig = [torch.linalg.eigh(K) for K in factors]
    lam = eig[0][0]
    for l, _ in eig[1:]:
        lam = torch.outer(lam, l).reshape(-1)
    L = lam + noise
    z = torch_kron_mv([Q.t() for _, Q in eig], y) / L[:, None]
    return torch_kron_mv([Q for _, Q in eig], z), torch.log(L).sum()


def gpytorch_operator(factors: List[torch.Tensor], noise):
    """``KroneckerProductAddedDiagLinearOperator``; ``noise`` a float or a one-element tensor."""
    from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator, KroneckerProductLinearOperator

    N = math.prod(K.shape[0] for K in factors)
    kron = KroneckerProductLinearOperator(*[DenseLinearOperator(K) for K in factors])
    noise_t = torch.as_tensor(noise, dtype=factors[0].dtype, device=factors[0].device).reshape(1)
    return kron + ConstantDiagLinearOperator(noise_t, N)


def gpytorch_kron_mv(factors: List[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

    return KroneckerProductLinearOperator(*[DenseLinearOperator(K) for K in factors]) @ v


def gpytorch_solve_logdet(factors: List[torch.Tensor], noise: float, y: torch.Tensor):
    """A fresh operator per call (its eigendecomposition included, as for the other providers)."""
    op = gpytorch_operator(factors, noise)
    return op.solve(y), op.logdet()


def need_gpytorch(provider: str) -> None:
    if provider == "gpytorch" and not HAS_GPYTORCH:
        pytest.skip("gpytorch / linear_operator not installed (pip install 'pyfast-kernels[bench]')")
