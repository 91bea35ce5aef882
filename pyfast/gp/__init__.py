"""Kronecker-structured Gaussian processes on grids.

    Kv = pyfast.gp.kron_mv([K1, K2, K3], v)                  # (n1 n2 n3[, B])
    grid = pyfast.gp.KroneckerGrid([K1, K2, K3], noise=1e-2)
    alpha, logdet = grid.solve(y), grid.logdet()
    mll = grid.marginal_log_likelihood(y)                       # differentiable in K_d and noise
    solver = pyfast.gp.pde.PROBLEMS["poisson1d_sin100"].solver(); solver.fit()   # GP-HM PDE solver
"""
from . import pde, reference
from .cg import CGResult, incomplete_grid_solve
from .grid import KroneckerGrid
from .slq import LogdetEstimate, incomplete_grid_logdet
from .kernels import COMPONENTS, kernel_matrix, mixture_of_products_mv, product_of_mixtures
from .ops import kron_mv, mode_product

__all__ = [
    "CGResult",
    "COMPONENTS",
    "incomplete_grid_logdet",
    "incomplete_grid_solve",
    "KroneckerGrid",
    "LogdetEstimate",
    "kernel_matrix",
    "kron_mv",
    "mixture_of_products_mv",
    "mode_product",
    "pde",
    "product_of_mixtures",
    "reference",
]
