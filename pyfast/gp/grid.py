"""Exact GP algebra on a full grid: ``A = K_1 (x) ... (x) K_D + noise * D`` through per-factor
eigendecompositions.

``D`` is the identity or a Kronecker-structured diagonal ``diag(d_1) (x) ... (x) diag(d_D)``
(positive ``d_d``). With ``S_d = diag(d_d)^{1/2}`` every factor is whitened,
``S_d^{-1} K_d S_d^{-1} = Q_d diag(lam_d) Q_d^T``, so with ``P_d = S_d^{-1} Q_d`` and
``P = P_1 (x) ... (x) P_D``:

    A^{-1} = P diag(1 / L) P^T,   L = lam_1 (x) ... (x) lam_D + noise,
    log |A| = sum log L + sum_d (N / n_d) sum log d_d.

Both are exact (no iteration); other diagonals (heteroscedastic noise, missing points) are not
Kronecker-structured and need an iterative solver. Gradients are closed-form in the eigenbasis
(no backward through ``eigh``): with ``beta = L^{-1} P^T y`` and ``lam_{-d}`` the product of the
other factors' eigenvalues,

    d log|A| / dK_d = P_d diag(w_d) P_d^T,  w_d = sum over other axes of lam_{-d} / L,
    d (c^T A^{-1} y) / dK_d = -P_d unfold_d(gamma) unfold_d(lam_{-d} beta)^T P_d^T,  gamma = L^{-1} P^T c,

and ``d/dnoise``, ``d/dd_d`` likewise (``P_e^T K_e P_e = diag(lam_e)``, ``P_e^T diag(d_e) P_e = I``).
"""
from __future__ import annotations

import importlib
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _ext
from .._backend import backend_for, register_op
from .._checks import check_tensor, value_checks_enabled
from .._linalg import eigh_threads
from . import _modes, ops, reference

# Scaling by L^p and sum log L with L = noise + lam_1 (x) ... (x) lam_D computed on the fly
# (csrc/cpu/gp, triton_kernels/gp/spectrum.py); elsewhere L is materialized once per grid. On the
# CPU the scaling runs inside the eigenbasis kernel (`_modes.kron_eigen_apply`) where it applies.
register_op("gp.eigen_scale", cpu=(torch.float32, torch.float64), triton=(torch.float32, torch.float64),
            cpu_path="C++ eigenbasis kernel: P diag(L^p) P^T x in one buffer, L computed on the fly")

# Factors up to this size are decomposed on the CPU even when the data lives on CUDA: torch's GPU
# eigh is slow for small matrices (a 32 x 32 CUDA eigh was measured at 19 ms vs 41 us on a CPU).
# The crossover awaits a GPU benchmark.
EIGH_ON_CPU_MAX = 2048


def _eigh64(K: Tensor) -> Tuple[Tensor, Tensor]:
    """float64 ``eigh`` of a small symmetric matrix, on the CPU when it is small (see above)."""
    work = K.detach().to(torch.float64)
    if work.is_cuda and work.shape[0] <= EIGH_ON_CPU_MAX:
        work = work.cpu()
    with eigh_threads(work):
        lam, Q = torch.linalg.eigh(work)
    return lam.to(K.device), Q.to(K.device)


def _spectrum_backend(t: Tensor) -> str:
    """``cpu`` / ``triton`` when a kernel scales by L and sums log L on the fly for ``t``'s device
    and dtype, else ``torch`` (L materialized once per grid)."""
    backend = backend_for("gp.eigen_scale", t).backend
    return "torch" if backend == "reference" else backend


def _triton():
    return importlib.import_module("pyfast.triton_kernels.gp")


def _spectrum_range(extremes: Sequence[Tuple[float, float]], noise: float) -> Tuple[float, float]:
    """``(min L, max L)`` from each factor's (smallest, largest) eigenvalue: ``L - noise`` is
    multilinear in the factor eigenvalues, so its extremes are products of factor extremes."""
    products = [1.0]
    for low, high in extremes:
        products = [p * e for p in products for e in (low, high)]
    return min(products) + noise, max(products) + noise


def _outer_all(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 (x) ... (x) v_D`` as a flat vector (row-major grid)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.outer(out, v).reshape(-1)
    return out


class _Solve(torch.autograd.Function):
    """``(alpha = A^{-1} y, log|A|)`` for a `KroneckerGrid`, with the closed-form backward above."""

    @staticmethod
    def forward(ctx, grid: "KroneckerGrid", y: Tensor, noise: Tensor, *params: Tensor):
        needed = any(ctx.needs_input_grad)  # the backward needs beta = L^{-1} P^T y
        ctx.grid = grid
        if not needed and grid._eigen_kernel(y):
            ctx.save_for_backward(None)
            return grid._eigen_apply(y, rotate_in=True, power=-1.0, rotate_out=True), grid._logdet_value()
        beta = grid._beta(y)
        alpha = grid._from_eigenbasis(beta, consume=not needed)  # beta is scratch when not needed
        ctx.save_for_backward(beta if needed else None)
        return alpha, grid._logdet_value()

    @staticmethod
    def backward(ctx, grad_alpha: Optional[Tensor], grad_logdet: Optional[Tensor]):
        g = ctx.grid
        (beta,) = ctx.saved_tensors
        D = len(g.sizes)
        cols = beta.shape[1]
        inv_L = 1.0 / g._eigenvalues
        grad_y = None
        grad_noise = torch.zeros((), dtype=torch.float64, device=beta.device)
        grad_K: List[Optional[Tensor]] = [torch.zeros_like(p) for p in g._P]
        grad_d: List[Optional[Tensor]] = [torch.zeros_like(p[:, 0]) for p in g._P]
        noise = float(g._noise_value)
        if grad_alpha is not None and cols > 0:
            gamma = g._beta(grad_alpha.contiguous())  # L^{-1} P^T grad
            if ctx.needs_input_grad[1]:
                grad_y = g._from_eigenbasis(gamma)
            grad_noise = grad_noise - (gamma * beta).sum().double()
            for d in range(D):
                n = g.sizes[d]
                scaled = (beta.view(*g.sizes, cols) * g._lam_without(d).to(beta.dtype)[..., None]).view(-1, cols)
                inner = _modes.mode_gram(gamma, scaled, g.sizes, d, cols, n, n)
                grad_K[d] = grad_K[d] - g._P[d] @ inner @ g._P[d].t()
                if g.diagonals is not None:
                    inner_d = _modes.mode_gram(gamma, beta, g.sizes, d, cols, n, n)
                    grad_d[d] = grad_d[d] - noise * ((g._P[d] @ inner_d) * g._P[d]).sum(1)
        if grad_logdet is not None:
            scale = grad_logdet.double()
            grad_noise = grad_noise + scale * inv_L.sum()
            for d in range(D):
                w = g._contract_others(inv_L, d)
                grad_K[d] = grad_K[d] + (scale * (g._P[d].double() * w) @ g._P[d].double().t()).to(beta.dtype)
                if g.diagonals is not None:
                    w_d = _modes.mode_sum(inv_L, g.sizes, d)
                    grad_d[d] = grad_d[d] + (noise * scale * (g._P[d].double() ** 2 @ w_d)).to(beta.dtype)
        grads_params: List[Optional[Tensor]] = [k.to(f.dtype) for k, f in zip(grad_K, g.factors)]
        if g.diagonals is not None:
            grads_params += [dd.to(v.dtype) for dd, v in zip(grad_d, g.diagonals)]
        return (None, grad_y, grad_noise.to(g._noise_dtype), *grads_params)


class KroneckerGrid:
    """``A = K_1 (x) ... (x) K_D + noise * D`` on a full grid, factored once.

    Args:
        factors: symmetric positive semi-definite ``K_d (n_d, n_d)``, float32/float64 (all one
            dtype and device); may require grad.
        noise: positive float or one-element tensor (may require grad).
        diagonals: optional positive ``d_d (n_d,)``; then ``D = diag(d_1) (x) ... (x) diag(d_D)``
            (e.g. per-axis noise scales), else ``D = I``. May require grad.
        jitter: added to every factor's diagonal before factoring (``K_d + jitter I``); the
            operator, its log-det and gradients are then exactly those of the jittered factors.
            Never applied silently: a numerically singular factor that noise * D does not
            regularize raises a warning naming it and the jitter.

    The eigendecompositions run once, in float64, at construction; a new grid is needed when the
    factors or the noise change (e.g. each optimizer step). All results are differentiable w.r.t.
    ``y``, ``noise``, every factor and every diagonal.
    """

    def __init__(
        self,
        factors: Sequence[Tensor],
        noise: Union[float, Tensor],
        diagonals: Optional[Sequence[Tensor]] = None,
        *,
        jitter: float = 0.0,
    ):
        fn = "KroneckerGrid"
        if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)) or not factors:
            raise TypeError(f"{fn}: factors must be a non-empty list or tuple of square tensors, got {type(factors).__name__}")
        first = factors[0]
        check_tensor(fn, "factors[0]", first, ndim=2, dims="(n_0, n_0)", dtypes=(torch.float32, torch.float64))
        ops.check_factors(fn, factors, first, square=True)
        for d, f in enumerate(factors):
            if f.shape[0] == 0:
                raise ValueError(f"{fn}: factors[{d}] must have at least one row, got shape {tuple(f.shape)}")
        self.factors = list(factors)
        self.sizes = [f.shape[0] for f in factors]
        self.dtype, self.device = first.dtype, first.device
        self.noise = self._check_noise(fn, noise)
        self.diagonals = None if diagonals is None else self._check_diagonals(fn, diagonals)
        if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not jitter >= 0:
            raise ValueError(f"{fn}: jitter must be a float >= 0, got {jitter!r}")
        self.jitter = float(jitter)
        self._factor()

    # ---- validation ----------------------------------------------------------------------------

    def _check_noise(self, fn: str, noise) -> Tensor:
        if isinstance(noise, Tensor):
            if noise.numel() != 1 or not noise.is_floating_point():
                raise ValueError(f"{fn}: noise must be a float or a one-element floating tensor, got shape {tuple(noise.shape)}")
            value = float(noise.detach())
            noise_t = noise.reshape(())
        elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
            value = float(noise)
            noise_t = torch.tensor(value, dtype=self.dtype, device=self.device)
        else:
            raise TypeError(f"{fn}: noise must be a float or a tensor, got {type(noise).__name__}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{fn}: noise must be positive and finite, got {value}")
        self._noise_value, self._noise_dtype = value, noise_t.dtype
        return noise_t

    def _check_diagonals(self, fn: str, diagonals) -> List[Tensor]:
        if isinstance(diagonals, Tensor) or not isinstance(diagonals, (list, tuple)) or len(diagonals) != len(self.sizes):
            raise TypeError(f"{fn}: diagonals must be a list of {len(self.sizes)} vectors (one per factor), got {diagonals!r:.80}")
        for d, (v, n) in enumerate(zip(diagonals, self.sizes)):
            check_tensor(fn, f"diagonals[{d}]", v, ndim=1, dims=f"({n},)", dtypes=(self.dtype,))
            if v.shape[0] != n or v.device != self.device:
                raise ValueError(f"{fn}: diagonals[{d}] must have shape ({n},) on {self.device}, got {tuple(v.shape)} on {v.device}")
            if value_checks_enabled() and not bool((v.detach() > 0).all() & torch.isfinite(v.detach()).all()):
                raise ValueError(f"{fn}: diagonals[{d}] must be positive and finite, got min {float(v.detach().min())}")
        return list(diagonals)

    # ---- factorization -------------------------------------------------------------------------

    def _factor(self) -> None:
        lams, Ps = [], []
        self._singular: List[str] = []
        self._extremes: List[Tuple[float, float]] = []
        for d, K in enumerate(self.factors):
            K64 = K.detach().to(torch.float64)
            if value_checks_enabled():
                asym = float((K64 - K64.t()).abs().max()) if K64.numel() else 0.0
                if asym > 1e-8 * max(float(K64.abs().max()), 1e-300):
                    raise ValueError(f"KroneckerGrid: factors[{d}] must be symmetric, got max |K - K^T| = {asym:.3g}")
            if self.jitter:
                K64 = K64 + self.jitter * torch.eye(K64.shape[0], dtype=torch.float64, device=K64.device)
            s_inv = None
            if self.diagonals is not None:
                s_inv = self.diagonals[d].detach().to(torch.float64).rsqrt()
                K64 = s_inv[:, None] * K64 * s_inv[None, :]
            lam, Q = _eigh64(K64)
            self._check_spectrum(d, lam)
            P = Q if s_inv is None else s_inv[:, None] * Q
            lams.append(lam)
            Ps.append(P)
        self._lams = lams
        low, high = _spectrum_range(self._extremes, self._noise_value)
        if value_checks_enabled() and not low > 0:
            raise ValueError(
                f"KroneckerGrid: K + noise * D is not positive definite (smallest eigenvalue {low:.3g}); "
                f"a factor is indefinite beyond rounding; pass a larger noise or jitter (now {self.jitter:g})"
            )
        self._warn_if_ill_conditioned(high / low)
        # Row-major copies of P and P^T (eigh returns column-major Q; GEMM views want row-major).
        self._P = [P.to(self.dtype).contiguous() for P in Ps]
        self._Pt = [P.t().contiguous() for P in self._P]
        # The N eigenvalues L are materialized only where no kernel computes them on the fly.
        self._L: Optional[Tensor] = None
        self._spectra: Dict[str, object] = {}  # per kernel backend, see _spectrum
        self._log_spectrum_sum: Optional[Tensor] = None  # sum log L, float64

    def _check_spectrum(self, d: int, lam: Tensor) -> None:
        """No clamping: an indefinite factor (beyond rounding) is an error."""
        low, high = float(lam[0]), float(lam[-1])  # eigh sorts ascending
        self._extremes.append((low, high))
        top = max(abs(low), abs(high))
        # Rounding of the factor's own entries moves eigenvalues by about n * eps * |K|.
        tol = lam.numel() * torch.finfo(self.dtype).eps * max(top, 1e-300)
        if low < -tol:
            raise ValueError(
                f"KroneckerGrid: factors[{d}] is not positive semi-definite (smallest eigenvalue {low:.3g}, "
                f"largest {top:.3g}); fix the kernel or pass jitter > {-low:.3g} (now {self.jitter:g})"
            )
        if low <= tol:
            self._singular.append(f"factors[{d}] (smallest eigenvalue {low:.3g}, largest {top:.3g})")

    def _warn_if_ill_conditioned(self, cond: float) -> None:
        """A numerically singular factor matters only when noise * D does not regularize it: warn
        when cond(A) exceeds 1 / sqrt(eps) (more than half the digits lost), naming the jitter."""
        if not self._singular:
            return
        if cond > torch.finfo(self.dtype).eps ** -0.5:
            warnings.warn(
                f"KroneckerGrid: numerically singular {', '.join(self._singular)} and cond(K + noise * D) = "
                f"{cond:.3g} with noise {self._noise_value:g}, jitter {self.jitter:g}; results are unclamped "
                f"but lose digits; pass a larger jitter (adds jitter * I to every factor) or noise",
                RuntimeWarning,
                stacklevel=4,
            )

    # ---- eigenbasis helpers (used by _Solve) -------------------------------------------------------

    def _lam_without(self, d: int) -> Tensor:
        """``lam_1 (x) .. 1 .. (x) lam_D`` (factor ``d`` left out), float64, shaped to broadcast
        against the grid ``(n_1, ..., n_D)``: size 1 along axis ``d``, ``N / n_d`` values."""
        out = torch.ones([1] * len(self.sizes), dtype=torch.float64, device=self.device)
        for e, lam in enumerate(self._lams):
            if e != d:
                out = out * lam.view([-1 if a == e else 1 for a in range(len(self.sizes))])
        return out

    def _contract_others(self, z: Tensor, d: int) -> Tensor:
        """``w[i] = sum`` over every axis but ``d`` of ``z[.., i, ..] * lam_{-d}``, ``z (N,)`` float64:
        one vector contraction per other axis (last first), no grid-sized temporary."""
        t = z.view(self.sizes)
        for e in reversed(range(len(self.sizes))):
            if e != d:
                t = torch.tensordot(t, self._lams[e], dims=([e], [0]))
        return t

    @property
    def _eigenvalues(self) -> Tensor:
        """``L (N,)`` float64, materialized on first use (the backward and non-CPU devices)."""
        if self._L is None:
            self._L = _outer_all(self._lams) + self._noise_value
        return self._L

    def _scale(self, z: Tensor, power: float) -> Tensor:
        """``z *= L^power`` in place (``z (N, B)``, a fresh tensor), power -1 or -1/2."""
        backend = _spectrum_backend(z) if z.is_contiguous() else "torch"
        if backend == "cpu":
            _ext.cpu.gp_scale_by_spectrum(_ext.DTYPE_TAG[z.dtype], z.data_ptr(), z.shape[1], *self._spectrum("cpu"),
                                          self._noise_value, power)
            return z
        if backend == "triton":
            return _triton().scale_by_spectrum(z, self._spectrum("triton"), self._noise_value, power)
        return z.mul_(self._eigenvalues.pow(power).to(z.dtype)[:, None])

    def _spectrum(self, backend: str):
        """The factor eigenvalues as the ``backend`` kernels take them, built once per grid:
        (addresses, sizes) for the C++ kernels, a device-side layout for Triton."""
        if backend not in self._spectra:
            self._spectra[backend] = (
                ([l.data_ptr() for l in self._lams], list(self.sizes)) if backend == "cpu"
                else _triton().spectrum_layout(self._lams)
            )
        return self._spectra[backend]

    def _eigen_kernel(self, x: Tensor) -> bool:
        """Whether the C++ eigenbasis kernel (`_eigen_apply`) runs for ``x (N, B)``."""
        return _spectrum_backend(x) == "cpu" and _modes.kernel_covers(x, self._P)

    def _eigen_apply(self, x: Tensor, rotate_in: bool, power: Optional[float], rotate_out: bool,
                     out: Optional[Tensor] = None) -> Tensor:
        """``P diag(L^power) P^T x``, ``diag(L^power) P^T x`` (no ``rotate_out``) or ``P x`` (no
        ``rotate_in``, ``power`` None) for ``x (N, B)`` by the C++ kernel, into ``out`` (may be
        ``x``) or a fresh tensor."""
        spectrum = None if power is None else (self._spectrum("cpu")[0], self._noise_value, power)
        return _modes.kron_eigen_apply(self._P, self._Pt, x, rotate_in, rotate_out, spectrum, out)

    def _beta(self, y: Tensor) -> Tensor:
        """``L^{-1} P^T y`` for ``y (N, B)``."""
        if self._eigen_kernel(y):
            return self._eigen_apply(y, rotate_in=True, power=-1.0, rotate_out=False)
        z = _modes.kron_apply(self._Pt, y, self.sizes, y.shape[1], apply=self._apply)
        return self._scale(z, -1.0)

    def inv_sqrt_mv(self, v: Tensor) -> Tensor:
        """``A^{-1/2} v = P diag(L^{-1/2}) P^T v`` for ``v (N, B)``, the symmetric inverse square root
        (``D = I`` only; no gradient). Used to precondition iterative methods."""
        if self.diagonals is not None:
            raise ValueError("KroneckerGrid.inv_sqrt_mv: the symmetric root needs D = I (no diagonals)")
        if self._eigen_kernel(v):
            return self._eigen_apply(v, rotate_in=True, power=-0.5, rotate_out=True)
        z = _modes.kron_apply(self._Pt, v, self.sizes, v.shape[1], apply=self._apply)
        z = self._scale(z, -0.5)
        return _modes.kron_apply(self._P, z, self.sizes, v.shape[1], apply=self._apply, consume=True)

    def _from_eigenbasis(self, beta: Tensor, consume: bool = False) -> Tensor:
        """``P beta``; with ``consume``, ``beta`` is overwritten (scratch)."""
        if self._eigen_kernel(beta):
            return self._eigen_apply(beta, rotate_in=False, power=None, rotate_out=True, out=beta if consume else None)
        return _modes.kron_apply(self._P, beta, self.sizes, beta.shape[1], apply=self._apply, consume=consume)

    def _logdet_value(self) -> Tensor:
        if self._log_spectrum_sum is None:  # solve() and logdet() both need it: computed once per grid
            backend = _spectrum_backend(self._P[0])
            if backend == "cpu":
                total = _ext.cpu.gp_log_spectrum_sum(*self._spectrum("cpu"), self._noise_value)
                self._log_spectrum_sum = torch.tensor(total, dtype=torch.float64)
            elif backend == "triton":
                self._log_spectrum_sum = _triton().log_spectrum_sum(self._spectrum("triton"), self._noise_value)
            else:
                self._log_spectrum_sum = torch.log(self._eigenvalues).sum()
        ld = self._log_spectrum_sum.clone()  # a fresh scalar: autograd claims the returned tensor
        if self.diagonals is not None:
            N = self.num_points
            for d, v in zip(self.sizes, self.diagonals):
                ld = ld + (N // d) * torch.log(v.detach().to(torch.float64)).sum()
        return ld.to(self.dtype)

    @property
    def _apply(self):
        return ops._apply(ops._choose("gp.kron_mv", self._P[0]))

    # ---- public API ------------------------------------------------------------------------------

    @property
    def num_points(self) -> int:
        return math.prod(self.sizes)

    @property
    def eigenvalues(self) -> List[Tensor]:
        """float64 eigenvalues of each (jittered, whitened) factor, ascending."""
        return list(self._lams)

    def _params(self) -> List[Tensor]:
        return self.factors + ([] if self.diagonals is None else self.diagonals)

    def _check_y(self, fn: str, y) -> None:
        ops.check_grid_vector(fn, "y", y, self.num_points, f"grid {tuple(self.sizes)}")
        if y.dtype != self.dtype or y.device != self.device:
            raise TypeError(f"{fn}: y must be {self.dtype} on {self.device} like the factors, got {y.dtype} on {y.device}")

    def _solve_and_logdet(self, fn: str, y: Tensor) -> Tuple[Tensor, Tensor]:
        self._check_y(fn, y)
        if ops.get_backend() == "reference":
            return (reference.solve(self._jittered(), self.noise, y, self.diagonals),
                    reference.logdet(self._jittered(), self.noise, self.diagonals))
        alpha, ld = _Solve.apply(self, ops._as_matrix(y), self.noise, *self._params())
        return (alpha.squeeze(1) if y.dim() == 1 else alpha), ld

    def _jittered(self) -> List[Tensor]:
        if not self.jitter:
            return self.factors
        return [K + self.jitter * torch.eye(K.shape[0], dtype=K.dtype, device=K.device) for K in self.factors]

    def solve(self, y: Tensor) -> Tensor:
        """``A^{-1} y`` for ``y (N,)`` or ``(N, B)`` (``N = prod n_d``, row-major grid)."""
        return self._solve_and_logdet("KroneckerGrid.solve", y)[0]

    def logdet(self) -> Tensor:
        """``log |A|`` (accumulated in float64), a scalar in the factors' dtype."""
        if ops.get_backend() == "reference":
            return reference.logdet(self._jittered(), self.noise, self.diagonals)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in [self.noise, *self._params()])):
            return self._logdet_value()
        empty = torch.zeros(self.num_points, 0, dtype=self.dtype, device=self.device)
        return _Solve.apply(self, empty, self.noise, *self._params())[1]

    def inv_quad_logdet(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        """``(y^T A^{-1} y, log |A|)``; the quadratic form has one entry per column of ``y``."""
        alpha, ld = self._solve_and_logdet("KroneckerGrid.inv_quad_logdet", y)
        return (y * alpha).sum(0), ld

    def marginal_log_likelihood(self, y: Tensor) -> Tensor:
        """``log N(y | 0, A)``, one entry per column of ``y`` (``()`` for a vector)."""
        quad, ld = self.inv_quad_logdet(y)
        return -0.5 * quad - 0.5 * ld - 0.5 * self.num_points * math.log(2 * math.pi)
