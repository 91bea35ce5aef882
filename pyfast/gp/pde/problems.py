"""The benchmark problems of GP-HM (Fang et al., ICLR 2024, Sec. 6) with exact solutions.

Each `Problem` has the PDE operator in the `GPHMSolver` convention ``operator(u, d, coords)``,
the exact solution, its domain and the paper's collocation grid size. The source ``f = L[u]``
(and the boundary data) come from the exact solution: derivatives by autograd (`ExactDerivatives`,
the same interface as `Derivatives`), so every source is exact to rounding.

    problem = PROBLEMS["poisson1d_sin100"]
    solver = problem.solver()                 # GPHMSolver on the paper's grid
    solver.fit()
    error = problem.relative_error(solver)    # relative L2 on a finer test grid
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .solver import GPHMSolver


class ExactDerivatives:
    """`Derivatives` of an exact solution ``fn(*coords)`` by autograd (for sources)."""

    def __init__(self, fn: Callable[..., Tensor], coords: Sequence[Tensor]):
        self._coords = [c.detach().requires_grad_() for c in coords]
        with torch.enable_grad():
            self.u = fn(*self._coords)

    def _grad(self, v: Tensor, axis: int) -> Tensor:
        # u at a grid point depends on that point's coordinates only: d(sum v)/dc = dv/dc pointwise.
        with torch.enable_grad():
            return torch.autograd.grad(v.sum(), self._coords[axis], create_graph=True)[0]

    def x(self, axis: int = 0) -> Tensor:
        return self._grad(self.u, axis)

    def xx(self, axis: int = 0) -> Tensor:
        return self._grad(self.x(axis), axis)

    def xy(self, a: int, b: int) -> Tensor:
        return self._grad(self.x(a), b)

    def laplacian(self) -> Tensor:
        return sum(self.xx(a) for a in range(len(self._coords)))


@dataclass(frozen=True)
class Problem:
    """A PDE ``L[u] = f`` in the box ``domain`` with Dirichlet data ``u = g`` on its faces."""

    name: str
    description: str
    domain: Tuple[Tuple[float, float], ...]
    points: Tuple[int, ...]  # the paper's collocation grid
    solution: Callable[..., Tensor]  # u(*coords)
    operator: Callable  # operator(u, d, coords) -> L[u]

    @property
    def dim(self) -> int:
        return len(self.domain)

    def axes(self, points: Optional[Sequence[int]] = None, dtype=torch.float64, device=None) -> List[Tensor]:
        points = self.points if points is None else tuple(points)
        if len(points) != self.dim or any(isinstance(p, bool) or not isinstance(p, int) or p < 3 for p in points):
            raise ValueError(f"Problem {self.name}: points must be {self.dim} ints >= 3, got {points!r}")
        return [torch.linspace(lo, hi, p, dtype=dtype, device=device) for (lo, hi), p in zip(self.domain, points)]

    def source(self, *coords: Tensor) -> Tensor:
        d = ExactDerivatives(self.solution, coords)
        return self.operator(d.u, d, coords).detach()

    def solver(self, points: Optional[Sequence[int]] = None, device=None, **kwargs) -> GPHMSolver:
        """A `GPHMSolver` on this problem's grid (``points`` per axis; default the paper's)."""
        return GPHMSolver(self.operator, self.axes(points, device=device), self.source, self.solution, **kwargs)

    def relative_error(self, solver: GPHMSolver, test_points: Optional[Sequence[int]] = None) -> float:
        """Relative L2 error of ``solver.predict`` on an evenly spaced test grid (default: 1.5x
        the collocation points per axis, so most test points lie between collocation points)."""
        test_points = test_points or [int(1.5 * n) + 1 for n in solver.sizes]
        axes = self.axes(test_points, dtype=solver.axes[0].dtype, device=solver.axes[0].device)
        truth = self.solution(*torch.meshgrid(*axes, indexing="ij"))
        return float((solver.predict(axes) - truth).norm() / truth.norm())


def _poisson(u, d, coords):
    return d.laplacian()


def _allen_cahn(u, d, coords):
    return d.laplacian() + u * (u * u - 1)


def _advection(beta: float):
    def op(u, d, coords):  # axes (x, t): u_t + beta u_x
        return d.x(1) + beta * d.x(0)
    return op


_TWO_PI = 2 * math.pi


def _mix(x):
    return torch.sin(x) + 0.1 * torch.sin(20 * x) + torch.cos(100 * x)


_LIST = [
    Problem("poisson1d_sin100", "1-D Poisson, u = sin(100x) on [0, 2 pi]", ((0.0, _TWO_PI),), (400,),
            lambda x: torch.sin(100 * x), _poisson),
    Problem("poisson1d_xsin200", "1-D Poisson, u = x sin(200x) on [0, 2 pi]", ((0.0, _TWO_PI),), (900,),
            lambda x: x * torch.sin(200 * x), _poisson),
    Problem("poisson1d_sin6cos100", "1-D Poisson, u = sin(6x) cos(100x) on [0, 2 pi]", ((0.0, _TWO_PI),), (400,),
            lambda x: torch.sin(6 * x) * torch.cos(100 * x), _poisson),
    Problem("poisson1d_multiscale", "1-D Poisson, u = sin(x) + 0.1 sin(20x) + 0.05 sin(100x) on [0, 1]", ((0.0, 1.0),), (900,),
            lambda x: torch.sin(x) + 0.1 * torch.sin(20 * x) + 0.05 * torch.sin(100 * x), _poisson),
    Problem("poisson1d_sin500_quadratic", "1-D Poisson, u = sin(500x) - 2 (x - 0.5)^2 on [0, 1]", ((0.0, 1.0),), (400,),
            lambda x: torch.sin(500 * x) - 2 * (x - 0.5) ** 2, _poisson),
    Problem("allen_cahn1d_sin100", "1-D Allen-Cahn u'' + u (u^2 - 1) = f, u = sin(100x) on [0, 2 pi]", ((0.0, _TWO_PI),), (400,),
            lambda x: torch.sin(100 * x), _allen_cahn),
    Problem("allen_cahn2d_mix", "2-D Allen-Cahn, u = (sin x + 0.1 sin 20x + cos 100x)(same in y) on [0, 1]^2",
            ((0.0, 1.0), (0.0, 1.0)), (400, 400), lambda x, y: _mix(x) * _mix(y), _allen_cahn),
    Problem("poisson2d_sin100", "2-D Poisson, u = sin(100x) sin(100y) on [0, 2 pi]^2", ((0.0, _TWO_PI), (0.0, _TWO_PI)), (400, 400),
            lambda x, y: torch.sin(100 * x) * torch.sin(100 * y), _poisson),
    Problem("poisson2d_sin6cos20", "2-D Poisson, u = sin(6x) cos(20x) + sin(6y) cos(20y) on [0, 2 pi]^2",
            ((0.0, _TWO_PI), (0.0, _TWO_PI)), (200, 200),
            lambda x, y: torch.sin(6 * x) * torch.cos(20 * x) + torch.sin(6 * y) * torch.cos(20 * y), _poisson),
    Problem("advection_beta200", "advection u_t + 200 u_x = 0, u = sin(x - 200 t) on [0, 1]^2 (axes x, t)",
            ((0.0, 1.0), (0.0, 1.0)), (200, 200), lambda x, t: torch.sin(x - 200 * t), _advection(200.0)),
]

PROBLEMS: Dict[str, Problem] = {p.name: p for p in _LIST}
