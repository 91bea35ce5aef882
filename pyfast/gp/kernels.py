"""1-D stationary mixture kernels and their input derivatives, evaluated without ``(Q, n, n)`` tensors.

    K_ij = sum_q w_q h_q(d),  h_q(d) = g(d; l_q) cos(2 pi mu_q d),  d = x1_i - x2_j,  w_q = exp(log w_q)

with ``g`` one of `reference.COMPONENTS`. Outputs: ``K``, ``dK/dx = k'(d)`` (derivative in ``x1``)
and ``d2K/dx dx' = -k''(d)`` (mixed derivative); ``d2K/dx^2 = k''(d) = -d2K/dx dx'``.

Closed forms (``c = cos(2 pi mu d)``, ``s = sin(2 pi mu d)``, ``f = 2 pi mu``):
``h' = g' c - f g s`` and ``h'' = g'' c - 2 f g' s - f^2 g c``, with ``g', g''`` per component
(``r = |d| / l``; Matern 5/2: ``g' = -(5 d / 3 l^2)(1 + sqrt5 r) e^{-sqrt5 r}``,
``g'' = -(5 / 3 l^2)(1 + sqrt5 r - 5 r^2) e^{-sqrt5 r}``; Matern 3/2: ``g' = -(3 d / l^2) e^{-sqrt3 r}``,
``g'' = -(3 / l^2)(1 - sqrt3 r) e^{-sqrt3 r}``). Matern 1/2 has no derivative at ``d = 0``.

The torch path loops over components, accumulating ``(n1, n2)`` outputs; its backward recomputes
one component at a time (memory ``O(n1 n2)``, not ``O(Q n1 n2)``). On CUDA a Triton kernel
computes all three outputs in one pass over the tile, looping over components in registers.

Grid semantics over ``D`` axes (never switched silently):
- `product_of_mixtures`: ``K = K_1 (x) ... (x) K_D``, each ``K_d`` its own mixture (GP-HM):
  Kronecker-structured, so `KroneckerGrid` solves it exactly.
- `mixture_of_products_mv`: ``K = sum_q w_q k_{1q} (x) ... (x) k_{Dq}``, one weight per joint
  component (the classic spectral-mixture kernel on a grid): a sum of Kronecker products, applied
  by matvecs only (no exact eigen-solve exists).
"""
from __future__ import annotations

import importlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._backend import backend_for, get_backend, register_op
from .._checks import check_choice, check_tensor, value_checks_enabled
from . import reference
from .ops import check_grid_vector, kron_mv

COMPONENTS = reference.COMPONENTS
_SQRT3, _SQRT5 = math.sqrt(3.0), math.sqrt(5.0)
# The "cpu" path is the torch component loop below (no C++ kernel was written for it).
register_op("gp.kernel_matrix", cpu=(torch.float32, torch.float64), triton=(torch.float32,),
            cpu_path="torch loop over mixture components")


def _profile(d: Tensor, component: str, l: Tensor, derivatives: bool):
    """``(g, g', g'')`` of one component at ``d`` (``g', g''`` are None without derivatives)."""
    if component in ("rbf", "sm_gauss"):
        a = 0.5 if component == "rbf" else 1.0  # g = exp(-a d^2 / l^2)
        inv = a / (l * l)
        g = torch.exp(-inv * d * d)
        if not derivatives:
            return g, None, None
        return g, -2 * inv * d * g, (4 * inv * inv * d * d - 2 * inv) * g
    r = d.abs() / l
    if component == "matern12":
        return torch.exp(-r), None, None
    if component == "matern32":
        e = torch.exp(-_SQRT3 * r)
        g = (1 + _SQRT3 * r) * e
        if not derivatives:
            return g, None, None
        return g, -3 * d / (l * l) * e, -3 / (l * l) * (1 - _SQRT3 * r) * e
    e = torch.exp(-_SQRT5 * r)
    poly = 1 + _SQRT5 * r
    g = (poly + 5.0 / 3.0 * r * r) * e
    if not derivatives:
        return g, None, None
    return g, -5.0 / 3.0 * d / (l * l) * poly * e, -5.0 / 3.0 / (l * l) * (poly - 5 * r * r) * e


def _component_terms(d: Tensor, component: str, w: Tensor, l: Tensor, mu: Optional[Tensor], derivatives: bool):
    """``w h(d)`` and, with derivatives, ``w h'(d)`` and ``-w h''(d)`` for one component."""
    g, g1, g2 = _profile(d, component, l, derivatives)
    if mu is None:
        return (w * g,) if not derivatives else (w * g, w * g1, -w * g2)
    f = 2 * math.pi * mu
    c, s = torch.cos(f * d), torch.sin(f * d)
    if not derivatives:
        return (w * g * c,)
    h1 = g1 * c - f * g * s
    h2 = g2 * c - 2 * f * g1 * s - f * f * g * c
    return w * g * c, w * h1, -w * h2


def _mixture_torch(x1, x2, log_weights, lengthscales, means, component, derivatives) -> List[Tensor]:
    d = x1[:, None] - x2[None, :]
    outs: Optional[List[Tensor]] = None
    for q in range(log_weights.shape[0]):
        mu = None if means is None else means[q]
        terms = _component_terms(d, component, torch.exp(log_weights[q]), lengthscales[q], mu, derivatives)
        outs = list(terms) if outs is None else [o.add_(t) for o, t in zip(outs, terms)]
    return outs


class _Mixture(torch.autograd.Function):
    """Forward: all components accumulated (torch loop or Triton). Backward: one component at a
    time, recomputed under autograd, so peak memory stays O(n1 n2)."""

    @staticmethod
    def forward(ctx, x1, x2, log_weights, lengthscales, means, component, derivatives, backend):
        ctx.component, ctx.derivatives = component, derivatives
        ctx.save_for_backward(x1, x2, log_weights, lengthscales, means)
        if backend == "triton":
            triton_gp = importlib.import_module("pyfast.triton_kernels.gp")
            return tuple(triton_gp.mixture_kernel_fwd(x1, x2, log_weights, lengthscales, means, component, derivatives))
        with torch.no_grad():
            return tuple(_mixture_torch(x1, x2, log_weights, lengthscales, means, component, derivatives))

    @staticmethod
    def backward(ctx, *grads):
        x1, x2, log_weights, lengthscales, means = ctx.saved_tensors
        wants = ctx.needs_input_grad[:5]
        leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(ctx.saved_tensors, wants)]
        x1l, x2l, lwl, lsl, mul = leaves
        acc = [torch.zeros_like(t) if (t is not None and w) else None for t, w in zip(leaves, wants)]
        needed = [(i, t) for i, t in enumerate(leaves) if t is not None and wants[i]]
        if not needed:
            return (None,) * 8
        for q in range(log_weights.shape[0]):
            with torch.enable_grad():
                d = x1l[:, None] - x2l[None, :]
                mu = None if mul is None else mul[q]
                terms = _component_terms(d, ctx.component, torch.exp(lwl[q]), lsl[q], mu, ctx.derivatives)
                total = sum((g * t).sum() for g, t in zip(grads, terms) if g is not None)
            got = torch.autograd.grad(total, [t for _, t in needed], allow_unused=True)
            for (i, _), g in zip(needed, got):
                if g is not None:
                    acc[i] += g
        return (*acc, None, None, None)


def _as_param(fn: str, name: str, value, like: Tensor) -> Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((1,), float(value), dtype=like.dtype, device=like.device)
    check_tensor(fn, name, value, dtypes=(like.dtype,))
    if value.dim() > 1:
        raise ValueError(f"{fn}: {name} must be a scalar or 1-D (Q,), got shape {tuple(value.shape)}")
    return value.reshape(-1)


def kernel_matrix(
    x1: Tensor,
    x2: Tensor,
    *,
    component: str,
    lengthscales: Union[float, Tensor],
    log_weights: Union[float, Tensor] = 0.0,
    means: Optional[Union[float, Tensor]] = None,
    derivatives: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """Fused 1-D mixture kernel ``K (n1, n2)``, optionally with ``dK/dx`` and ``d2K/dx dx'``.

    Args:
        x1, x2: ``(n1,)``, ``(n2,)`` float32/float64 inputs.
        component: one of `COMPONENTS` (see `reference.mixture_kernel`).
        lengthscales: positive ``(Q,)`` (or a float, ``Q = 1``).
        log_weights: ``(Q,)`` log-domain weights ``log w_q`` (0: unit weight).
        means: ``(Q,)`` frequencies ``mu_q`` of ``cos(2 pi mu_q d)``; None for no cosine.
        derivatives: also return ``dK/dx_ij = dk/dx1_i`` and ``d2K/dx dx'_ij = d^2 k/dx1_i dx2_j``
            (not for ``matern12``, which is not differentiable at ``d = 0``).

    Returns:
        ``K`` or ``(K, dK_dx, d2K_dxdx)``, each ``(n1, n2)`` in ``x1.dtype``; differentiable
        w.r.t. inputs and parameters.
    """
    fn = "kernel_matrix"
    check_tensor(fn, "x1", x1, ndim=1, dims="(n1,)", dtypes=(torch.float32, torch.float64))
    check_tensor(fn, "x2", x2, ndim=1, dims="(n2,)", dtypes=(x1.dtype,))
    check_choice(fn, "component", component, COMPONENTS)
    if derivatives and component == "matern12":
        raise ValueError(f"{fn}: component 'matern12' has no derivative at d = 0; use matern32 or matern52 with derivatives=True")
    ls = _as_param(fn, "lengthscales", lengthscales, x1)
    lw = _as_param(fn, "log_weights", log_weights, x1)
    mu = None if means is None else _as_param(fn, "means", means, x1)
    q = ls.shape[0]
    if lw.shape[0] == 1 and q > 1:
        lw = lw.expand(q)
    for name, t in (("log_weights", lw), ("means", mu)):
        if t is not None and t.shape[0] != q:
            raise ValueError(f"{fn}: {name} must have {q} entries like lengthscales, got {t.shape[0]}")
    if any(t is not None and t.device != x1.device for t in (x2, ls, lw, mu)):
        raise ValueError(f"{fn}: all tensors must be on {x1.device}")
    if value_checks_enabled() and not torch.compiler.is_compiling():
        if not bool((ls.detach() > 0).all()):
            raise ValueError(f"{fn}: lengthscales must be positive, got min {float(ls.detach().min())}")
        for name, t in (("x1", x1), ("x2", x2), ("log_weights", lw), ("means", mu)):
            if t is not None and not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"{fn}: {name} must be finite")
    if get_backend() == "reference":
        return _reference(x1, x2, lw, ls, mu, component, derivatives)
    backend = "triton" if backend_for("gp.kernel_matrix", x1).backend == "triton" else "torch"
    outs = _Mixture.apply(x1, x2, lw, ls, mu, component, derivatives, backend)
    return outs if derivatives else outs[0]


def _reference(x1, x2, lw, ls, mu, component, derivatives):
    fn = lambda a, b: reference.mixture_kernel(a, b, lw, ls, mu, component)  # noqa: E731
    if not derivatives:
        return fn(x1, x2)
    return reference.kernel_derivatives(fn, x1, x2)


def product_of_mixtures(xs: Sequence[Tensor], mixtures: Sequence[dict]) -> List[Tensor]:
    """GP-HM grid kernel: one mixture per axis, ``K = K_1 (x) ... (x) K_D`` with
    ``K_d = kernel_matrix(xs[d], xs[d], **mixtures[d])``. Returns the factors (for `KroneckerGrid`)."""
    if len(xs) != len(mixtures):
        raise ValueError(f"product_of_mixtures: got {len(xs)} axes but {len(mixtures)} mixtures")
    return [kernel_matrix(x, x, **m) for x, m in zip(xs, mixtures)]


def mixture_of_products_mv(
    xs: Sequence[Tensor], v: Tensor, *, component: str, log_weights: Tensor, lengthscales: Tensor,
    means: Optional[Tensor] = None,
) -> Tensor:
    """``(sum_q w_q k_{1q} (x) ... (x) k_{Dq}) v``: one weight ``w_q = exp(log_weights_q)`` per
    joint component; ``lengthscales``/``means`` are ``(D, Q)`` (per axis and component). ``v`` is
    ``(prod n_d[, B])``. Peak memory: one component's ``D`` factors at a time."""
    fn = "mixture_of_products_mv"
    check_tensor(fn, "log_weights", log_weights, ndim=1, dims="(Q,)")
    check_tensor(fn, "lengthscales", lengthscales, ndim=2, dims="(D, Q)")
    D, Q = lengthscales.shape
    if D != len(xs) or log_weights.shape[0] != Q or (means is not None and tuple(means.shape) != (D, Q)):
        raise ValueError(f"{fn}: expected {len(xs)} axes and (D, Q) parameters, got lengthscales "
                         f"{tuple(lengthscales.shape)}, log_weights {tuple(log_weights.shape)}, "
                         f"means {None if means is None else tuple(means.shape)}")
    check_grid_vector(fn, "v", v, math.prod([x.shape[0] for x in xs]), "the grid size")
    out = None
    for q in range(Q):
        factors = [
            kernel_matrix(x, x, component=component, lengthscales=lengthscales[d, q : q + 1],
                          means=None if means is None else means[d, q : q + 1])
            for d, x in enumerate(xs)
        ]
        term = torch.exp(log_weights[q]) * kron_mv(factors, v)
        out = term if out is None else out + term
    return out
