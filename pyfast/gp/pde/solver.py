"""GP-HM: a Gaussian-process solver for high-frequency and multi-scale PDEs on a full grid
(Fang et al., "Solving High Frequency and Multi-Scale PDEs with Gaussian Processes", ICLR 2024).

The grid values ``U`` of the solution get the prior ``N(0, C)``, ``C = K_1 (x) ... (x) K_D`` with
one `SpectralMixture` per axis; derivatives are ``U`` mapped by ``K_d^(k) K_d^{-1}`` along one axis
(`Derivatives`). `GPHMSolver.fit` minimizes the negative log joint (paper eq. 9)

    -log N(vec U | 0, C) - lambda_b sum_b log N(g_b | U_b, 1 / tau_b) - sum_j log N(0 | r_j(U), 1 / tau_r)

over ``U``, the kernel parameters and the precisions ``tau_b``, ``tau_r`` (``r = L[u] - f`` on the
interior points). ``log N(U | 0, C)`` is exact through `KroneckerGrid` (per-factor ``eigh``).
Two schedules:

- ``"adam"``: the paper's: Adam on everything, ``U`` included.
- ``"alternating"`` (default): the objective is quadratic in ``U`` for a linear PDE at fixed
  hyperparameters, so ``U`` is set to its exact minimizer (a Gauss-Newton step, `inner.py`;
  repeated steps for a nonlinear PDE) every ``solve_every`` Adam steps on the hyperparameters.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..._checks import check_choice, check_tensor
from ..grid import KroneckerGrid
from ..ops import kron_mv
from . import inner
from .derivatives import AxisOperators, Derivatives
from .mixture import KERNELS, SpectralMixture

GridValues = Union[Tensor, Callable[..., Tensor]]


class FitHistory(NamedTuple):
    """Per logged step: ``steps``, ``loss`` (negative log joint), ``error`` (relative L2 against
    ``exact`` on the collocation grid when one was given, else empty); ``seconds`` in total."""

    steps: List[int]
    loss: List[float]
    error: List[float]
    seconds: float


class _Bar:
    """A transient rich progress bar over solves and Adam steps."""

    def __init__(self, total: int):
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("GP-HM", total=total)
        self._progress.start()

    def update(self, completed: int, description: str) -> None:
        self._progress.update(self._task, completed=completed, description=description)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int):
    return _Bar(total) if enabled else None


class GPHMSolver(nn.Module):
    """GP-HM solver on a rectangular 1-D, 2-D or 3-D grid.

    Args:
        operator: ``operator(u, d, coords) -> L[u]``: ``u`` the grid values ``(n_1, ..., n_D)``,
            ``d`` a `Derivatives` (``d.x(a)``, ``d.xx(a)``, ``d.xy(a, b)``, ``d.laplacian()``),
            ``coords`` the ``D`` broadcast coordinate tensors (``meshgrid(..., indexing="ij")``).
            Must return a ``(n_1, ..., n_D)`` tensor, differentiable in ``u``.
        axes: ``D`` strictly increasing 1-D coordinate tensors (``n_d >= 3``), float32/float64
            (float64 recommended; all one dtype and device).
        source: ``f`` with ``L[u] = f`` in the interior: a ``(n_1, ..., n_D)`` tensor or a callable
            of ``coords``; finite.
        boundary: ``g`` with ``u = g`` on the boundary: a grid tensor (read at the boundary points)
            or a callable of ``coords``; finite there.
        kernel: ``"matern52"`` (Student-t mixture, GP-HM-StM) or ``"sm_gauss"`` (GP-HM-GM).
        num_components: mixture components per axis.
        max_frequency: top of the initial frequency grid in cycles per unit (per axis: a float or a
            sequence); default each axis's Nyquist frequency.
        jitter: added to each factor's diagonal, relative to its mean diagonal (> 0).
        boundary_weight: ``lambda_b`` (> 0), the weight of the boundary likelihood.
        boundary_mask: bool ``(n_1, ..., n_D)`` of boundary points; default the faces of the box.
    """

    def __init__(self, operator: Callable, axes: Sequence[Tensor], source: GridValues, boundary: GridValues, *,
                 kernel: str = "matern52", num_components: int = 30, max_frequency=None, jitter: float = 1e-10,
                 boundary_weight: float = 200.0, boundary_mask: Optional[Tensor] = None):
        super().__init__()
        fn = "GPHMSolver"
        if not callable(operator):
            raise TypeError(f"{fn}: operator must be callable (u, d, coords) -> L[u], got {type(operator).__name__}")
        self.axes = _check_axes(fn, axes)
        x0 = self.axes[0]
        self.sizes = [a.shape[0] for a in self.axes]
        self.N = math.prod(self.sizes)
        self.coords = torch.meshgrid(*self.axes, indexing="ij")
        check_choice(fn, "kernel", kernel, KERNELS)
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"{fn}: num_components must be a positive int, got {num_components!r}")
        for name, value in (("jitter", jitter), ("boundary_weight", boundary_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{fn}: {name} must be a positive finite float, got {value!r}")
        tops = max_frequency if isinstance(max_frequency, (list, tuple)) else [max_frequency] * len(self.axes)
        if len(tops) != len(self.axes) or any(t is not None and not (isinstance(t, (int, float)) and t > 0) for t in tops):
            raise ValueError(f"{fn}: max_frequency must be None, a positive float or {len(self.axes)} of them, got {max_frequency!r}")
        self.operator = operator
        self.jitter, self.boundary_weight = float(jitter), float(boundary_weight)
        self.source = self._grid_values(fn, "source", source).reshape(-1)
        if boundary_mask is None:
            boundary_mask = torch.zeros(self.sizes, dtype=torch.bool, device=x0.device)
            for axis in range(len(self.sizes)):
                boundary_mask.select(axis, 0).fill_(True)
                boundary_mask.select(axis, -1).fill_(True)
        check_tensor(fn, "boundary_mask", boundary_mask, dtypes=(torch.bool,))
        if list(boundary_mask.shape) != self.sizes or not bool(boundary_mask.any()):
            raise ValueError(f"{fn}: boundary_mask must have shape {tuple(self.sizes)} with a True entry, "
                             f"got {tuple(boundary_mask.shape)}")
        self.boundary_mask = boundary_mask.reshape(-1).to(x0.device)
        self.interior = ~self.boundary_mask
        self.boundary_index = self.boundary_mask.nonzero().squeeze(1)
        g = self._grid_values(fn, "boundary", boundary, mask=self.boundary_mask).reshape(-1)
        self.g_full = torch.where(self.boundary_mask, g, torch.zeros_like(g))
        self.g = self.g_full[self.boundary_index]
        self.mixtures = nn.ModuleList(SpectralMixture(a, num_components, kernel, t) for a, t in zip(self.axes, tops))
        self.U = nn.Parameter(torch.zeros(self.N, dtype=x0.dtype, device=x0.device))
        self.log_tau_b = nn.Parameter(torch.zeros((), dtype=x0.dtype, device=x0.device))
        self.log_tau_r = nn.Parameter(torch.zeros((), dtype=x0.dtype, device=x0.device))
        self._checked = False

    # ---- inputs ------------------------------------------------------------------------------------

    def _grid_values(self, fn: str, name: str, values: GridValues, mask: Optional[Tensor] = None) -> Tensor:
        if callable(values) and not isinstance(values, Tensor):
            values = values(*self.coords)
        check_tensor(fn, name, values, dtypes=(self.axes[0].dtype,))
        if list(values.shape) != self.sizes:
            raise ValueError(f"{fn}: {name} must have the grid's shape {tuple(self.sizes)}, got {tuple(values.shape)}")
        checked = values.reshape(-1) if mask is None else values.reshape(-1)[mask]
        if not bool(torch.isfinite(checked).all()):
            raise ValueError(f"{fn}: {name} must be finite{' on the boundary' if mask is not None else ''}")
        return values.to(self.axes[0].device)

    # ---- model pieces ------------------------------------------------------------------------------

    def axis_operators(self) -> List[AxisOperators]:
        """Jittered factors and derivative operators for the current kernel parameters."""
        return [AxisOperators.build(*m.matrices(x), self.jitter) for m, x in zip(self.mixtures, self.axes)]

    def derivatives(self, U: Tensor, ops: Sequence[AxisOperators]) -> Derivatives:
        return Derivatives(U, ops, self.sizes)

    def residual(self, U: Tensor, ops: Sequence[AxisOperators], record: Optional[list] = None) -> Tensor:
        """``L[u] - f`` at the interior points, ``(N_interior,)``."""
        d = self.derivatives(U, ops)
        out = self.operator(U.reshape(self.sizes), d, self.coords)
        if not self._checked:
            if not isinstance(out, Tensor) or list(out.shape) != self.sizes:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"GPHMSolver: operator must return a tensor of the grid's shape {tuple(self.sizes)}, got {got}")
            self._checked = True
        if record is not None:
            record.extend(d.used())
        return (out.reshape(-1) - self.source)[self.interior]

    def prior(self, ops: Sequence[AxisOperators]) -> KroneckerGrid:
        # The factors are jittered, so C >= prod(jitter * scale_d) I; a noise 1e-12 times that keeps
        # KroneckerGrid's K + noise I equal to C to 1e-12 relative.
        floor = math.prod(float(o.K.detach().diagonal().mean()) * self.jitter for o in ops) * 1e-12
        return KroneckerGrid([o.K for o in ops], floor)

    def loss(self, U: Optional[Tensor] = None, ops: Optional[Sequence[AxisOperators]] = None) -> Tensor:
        """The negative log joint (module doc), a differentiable scalar."""
        U = self.U if U is None else U
        ops = self.axis_operators() if ops is None else ops
        nlp = -self.prior(ops).marginal_log_likelihood(U)
        tau_b, tau_r = torch.exp(self.log_tau_b), torch.exp(self.log_tau_r)
        nb = self.g.shape[0]
        r = self.residual(U, ops)
        boundary = 0.5 * tau_b * ((U[self.boundary_index] - self.g) ** 2).sum() - 0.5 * nb * self.log_tau_b
        equation = 0.5 * tau_r * (r * r).sum() - 0.5 * r.shape[0] * self.log_tau_r
        return nlp + self.boundary_weight * boundary + equation

    # ---- the exact inner solve ----------------------------------------------------------------------

    @torch.no_grad()
    def solve_values(self, *, method: str = "auto", newton_steps: int = 20, tol: float = 1e-10,
                     max_iter: int = 3000, dense_max: int = 3000) -> inner.InnerResult:
        """Set ``U`` to the minimizer of the objective at the current hyperparameters and precisions
        by Gauss-Newton steps (`inner.py`): one is exact for a linear PDE, detected by the residual
        after the step matching its linear prediction; otherwise up to ``newton_steps``, until
        the step is below ``1e-10`` relative. ``method``: ``"dense"`` (QR, up to a few thousand
        points), ``"cg"`` (matrix-free PCG to relative residual ``tol`` within ``max_iter``) or
        ``"auto"`` (dense up to ``dense_max`` points)."""
        fn = "GPHMSolver.solve_values"
        check_choice(fn, "method", method, ("auto", "dense", "cg"))
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 1:
            raise ValueError(f"{fn}: newton_steps must be a positive int, got {newton_steps!r}")
        if method == "auto":
            method = "dense" if self.N <= dense_max else "cg"
        ops = [AxisOperators(o.K.detach(), o.D1.detach(), o.D2.detach()) for o in self.axis_operators()]
        eig = inner.Eigenbasis(ops)
        beta_b = self.boundary_weight * float(torch.exp(self.log_tau_b))
        beta_r = float(torch.exp(self.log_tau_r))
        for _ in range(newton_steps):
            terms: list = []
            lin = inner.Linearized(lambda U: self.residual(U, ops, terms), self.U)
            if method == "dense":
                result = inner.solve_dense(lin, eig, self.boundary_index, self.g, beta_b, beta_r)
            else:
                result = inner.solve_cg(lin, eig, self.boundary_mask, self.g_full, beta_b, beta_r, terms, ops,
                                        self.sizes, self.interior, tol, max_iter)
            step = result.U - lin.U0.detach()
            predicted = lin.r0 + lin.J(step)
            self.U.copy_(result.U)
            actual = self.residual(self.U, ops)
            linear = float((actual - predicted).norm()) <= 1e-9 * max(float(actual.norm()), float(self.source.norm()), 1e-300)
            if linear or float(step.norm()) <= 1e-10 * float(result.U.norm()):
                break
        return result

    @torch.no_grad()
    def fit_spectrum(self, **kwargs) -> None:
        """Set every axis's mixture weights, frequencies and lengthscales from the periodogram of
        the current ``U`` along that axis (`SpectralMixture.fit_spectrum`); run after a `solve_values`."""
        U = self.U.detach().reshape(self.sizes)
        for axis, (m, x) in enumerate(zip(self.mixtures, self.axes)):
            if not m.uniform:
                raise ValueError(f"GPHMSolver.fit_spectrum: axes[{axis}] is not evenly spaced (needs an FFT grid)")
            m.fit_spectrum(x, U.movedim(axis, 0).reshape(self.sizes[axis], -1), **kwargs)

    # ---- training ----------------------------------------------------------------------------------

    def fit(self, steps: int = 0, *, schedule: str = "alternating", spectral_rounds: int = 2, lr: float = 1e-2,
            solve_every: int = 100, solve_method: str = "auto", exact: Optional[GridValues] = None,
            log_every: int = 50, progress: bool = True) -> FitHistory:
        """Optimize the GP-HM objective.

        ``schedule="alternating"`` (default): ``spectral_rounds`` times an exact ``U`` solve
        (`solve_values`) followed by `fit_spectrum`, then a final solve; then ``steps`` Adam steps
        (``lr``) on the kernel parameters and precisions with an exact solve every ``solve_every``
        steps and after the last. ``schedule="adam"``: the paper's schedule, ``steps`` Adam steps on
        everything, ``U`` included (typically 1e4 to 1e6 steps). ``exact``: the true solution on the
        grid (tensor or callable of coords), to log the error on the grid.
        """
        fn = "GPHMSolver.fit"
        check_choice(fn, "schedule", schedule, ("alternating", "adam"))
        for name, v, low in (("steps", steps, 0), ("spectral_rounds", spectral_rounds, 0), ("solve_every", solve_every, 1),
                             ("log_every", log_every, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
        truth = None if exact is None else self._grid_values(fn, "exact", exact).reshape(-1)
        history = FitHistory([], [], [], 0.0)
        start = time.perf_counter()
        alternating = schedule == "alternating"
        solves = spectral_rounds + 1 if alternating else 0
        bar = _progress(progress, solves + steps)
        done = 0

        def log(step: int) -> None:
            with torch.no_grad():
                history.steps.append(step)
                history.loss.append(float(self.loss()))
                if truth is not None:
                    history.error.append(float((self.U - truth).norm() / truth.norm()))
            if bar is not None:
                err = f", grid error {history.error[-1]:.2e}" if truth is not None else ""
                bar.update(done, f"GP-HM loss {history.loss[-1]:.4g}{err}")

        def solve() -> None:
            nonlocal done
            self.solve_values(method=solve_method)
            done += 1

        try:
            if alternating:
                for _ in range(spectral_rounds):
                    solve()
                    self.fit_spectrum()
                solve()
                log(0)
            hyper = [p for name, p in self.named_parameters() if name != "U"]
            opt = torch.optim.Adam(hyper + ([] if alternating else [self.U]), lr=lr)
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                self.loss().backward()
                opt.step()
                done += 1
                if alternating and (step % solve_every == 0 or step == steps):
                    self.solve_values(method=solve_method)
                if step % log_every == 0 or step == steps:
                    log(step)
        finally:
            if bar is not None:
                bar.close()
        return history._replace(seconds=time.perf_counter() - start)

    # ---- prediction --------------------------------------------------------------------------------

    @property
    def solution(self) -> Tensor:
        """The grid values ``U`` as ``(n_1, ..., n_D)`` (detached)."""
        return self.U.detach().reshape(self.sizes)

    @torch.no_grad()
    def predict(self, test_axes: Sequence[Tensor]) -> Tensor:
        """GP posterior mean ``(K*_1 (x) ... (x) K*_D) C^{-1} U`` on the grid ``test_axes``
        (``D`` 1-D tensors, any sizes ``m_d``): ``(m_1, ..., m_D)``."""
        fn = "GPHMSolver.predict"
        if isinstance(test_axes, Tensor) or not isinstance(test_axes, (list, tuple)) or len(test_axes) != len(self.axes):
            raise TypeError(f"{fn}: test_axes must be a list of {len(self.axes)} 1-D tensors, got {type(test_axes).__name__}")
        for d, t in enumerate(test_axes):
            check_tensor(fn, f"test_axes[{d}]", t, ndim=1, dims="(m_d,)", dtypes=(self.axes[0].dtype,))
        ops = self.axis_operators()
        alpha = self.prior(ops).solve(self.U.detach())
        cross = [m.cross(t.to(x.device), x) for m, t, x in zip(self.mixtures, test_axes, self.axes)]
        return kron_mv(cross, alpha).reshape([t.shape[0] for t in test_axes])


def _check_axes(fn: str, axes) -> List[Tensor]:
    if isinstance(axes, Tensor) or not isinstance(axes, (list, tuple)) or not 1 <= len(axes) <= 3:
        raise TypeError(f"{fn}: axes must be a list of 1 to 3 1-D coordinate tensors (a rectangular grid), "
                        f"got {type(axes).__name__}{'' if not isinstance(axes, (list, tuple)) else f' of length {len(axes)}'}")
    first = axes[0]
    for d, a in enumerate(axes):
        check_tensor(fn, f"axes[{d}]", a, ndim=1, dims="(n_d,): one coordinate per grid line", dtypes=(torch.float32, torch.float64))
        if a.dtype != first.dtype or a.device != first.device:
            raise TypeError(f"{fn}: axes[{d}] is {a.dtype} on {a.device} but axes[0] is {first.dtype} on {first.device}")
        if a.shape[0] < 3:
            raise ValueError(f"{fn}: axes[{d}] must have at least 3 points (two boundary, one interior), got {a.shape[0]}")
        if not bool(torch.isfinite(a).all()) or not bool((a[1:] > a[:-1]).all()):
            raise ValueError(f"{fn}: axes[{d}] must be finite and strictly increasing (grid lines), got {a[:5].tolist()}...")
    return [a.detach() for a in axes]
