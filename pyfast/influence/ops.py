"""EK-FAC influence ops: validation, `torch.library` custom ops over the Triton kernels, dispatch.

Paths per call: ``triton`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) runs the fused
kernels in ``pyfast.triton_kernels.influence`` through ``pyfast::influence_*`` custom ops;
``reference`` (`use_backend("reference")`) runs `reference.py`; everything else runs the chunked
torch code of `_torch.py` (the CPU path: no C++ kernel beat torch's GEMMs there). The ops compute
statistics, not training losses: they are not differentiable.

Shapes: ``a (b, T, d_in)`` layer inputs (bias as a ones column, `append_bias_column`),
``s (b, T, d_out)`` output gradients, ``mask (b, T)`` bool (or 0/1), True for tokens that count.
float16/bfloat16/float32 inputs accumulate in float32, float64 inputs in float64.
"""
from __future__ import annotations

import importlib
from typing import Optional, Union

import torch
from torch import Tensor

from .._backend import backend_for, get_backend, register_op
from .._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor, value_checks_enabled
from .._linalg import eigh_threads
from . import _torch, reference
from .factors import Eigen, EKFACFactors, LowRankQuery
from .reference import compute_dtype

_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64) + FLOAT_DTYPES

_CPU_PATH = "chunked torch GEMMs (_torch.py)"
register_op("influence.covariance", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS, cpu_path=_CPU_PATH)
register_op("influence.lambda_correction", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS, cpu_path=_CPU_PATH)
register_op("influence.self_scores", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS, cpu_path=_CPU_PATH)
register_op("influence.precondition", cpu=FLOAT_DTYPES, cpu_path=_CPU_PATH)
register_op("influence.pairwise_scores", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS, cpu_path=_CPU_PATH)


def _triton():
    return importlib.import_module("pyfast.triton_kernels.influence")


def _path(op: str, tensor: Tensor) -> str:
    """``triton`` | ``reference`` | ``torch`` (the chunked torch code: the CPU path, and the CUDA path
    where no Triton kernel covers the call)."""
    if get_backend() == "reference":
        return "reference"
    choice = backend_for(op, tensor).backend
    return "torch" if choice in ("cpu", "reference") else choice


def _eager_value_checks() -> bool:
    return value_checks_enabled() and not torch.compiler.is_compiling()


def _check_finite(fn: str, name: str, t: Tensor) -> None:
    if _eager_value_checks() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {name} has non-finite values (NaN or Inf)")


def _finite_or_explain(fn: str, out: Tensor, **inputs: Tensor) -> Tensor:
    """Value check after the fact: a NaN or Inf in any input reaches the (small) output, so only a
    non-finite output pays for scanning the (large) inputs to name the culprit."""
    if _eager_value_checks() and out.numel() and not bool(torch.isfinite(out).all()):
        for name, t in inputs.items():
            _check_finite(fn, name, t)
    return out


def _check_mask(fn: str, mask: Optional[Tensor], shape, what: str) -> None:
    if mask is None:
        return
    check_tensor(fn, "mask", mask, dtypes=_MASK_DTYPES)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: mask must have shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")


def _check_activations(fn: str, a: Tensor, s: Tensor, mask: Optional[Tensor]) -> None:
    check_tensor(fn, "a", a, ndim=3, dims="(examples, tokens, d_in)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "s", s, ndim=3, dims="(examples, tokens, d_out)", dtypes=FLOAT_DTYPES)
    if a.shape[:2] != s.shape[:2]:
        raise ValueError(
            f"{fn}: a and s must have the same (examples, tokens), got a {tuple(a.shape)} and s {tuple(s.shape)}"
        )
    if a.dtype != s.dtype:
        raise TypeError(f"{fn}: a and s must have the same dtype, got {a.dtype} and {s.dtype}")
    _check_mask(fn, mask, a.shape[:2], "examples, tokens")
    check_same_device(fn, a=a, s=s, mask=mask)


def _check_basis(fn: str, name: str, Q: Tensor, d: int) -> None:
    check_tensor(fn, name, Q, ndim=2, dtypes=FLOAT_DTYPES)
    if tuple(Q.shape) != (d, d):
        raise ValueError(f"{fn}: {name} must have shape ({d}, {d}), got {tuple(Q.shape)}")


def _check_factors(fn: str, factors, d_out: int, d_in: int) -> None:
    if not isinstance(factors, EKFACFactors):
        raise TypeError(f"{fn}: factors must be EKFACFactors(Q_A, Q_S, Lambda), got {type(factors).__name__}")
    _check_basis(fn, "factors.Q_A", factors.Q_A, d_in)
    _check_basis(fn, "factors.Q_S", factors.Q_S, d_out)
    check_tensor(fn, "factors.Lambda", factors.Lambda, ndim=2, dtypes=FLOAT_DTYPES)
    if tuple(factors.Lambda.shape) != (d_out, d_in):
        raise ValueError(f"{fn}: factors.Lambda must have shape ({d_out}, {d_in}), got {tuple(factors.Lambda.shape)}")


def _damping(fn: str, factors: EKFACFactors, damping: Optional[float]) -> float:
    if damping is None:
        return reference.default_damping(factors.Lambda)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{fn}: damping must be a float or None, got {type(damping).__name__}")
    if not damping > 0:
        raise ValueError(f"{fn}: damping must be > 0, got {damping}")
    return float(damping)


def _inverse(factors: EKFACFactors, damping: float) -> Tensor:
    """``1 / (Lambda + damping)`` in float64."""
    return 1.0 / (factors.Lambda.to(torch.float64) + damping)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if mask is None else mask.to(dtype)


# --------------------------------------------------------------------------------------------------
# covariance
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::influence_covariance", mutates_args=())
def _covariance_op(x: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    return _triton().covariance_sum(x, mask)


@_covariance_op.register_fake
def _(x, mask, backend):
    d = x.shape[-1]
    return x.new_empty((d, d), dtype=torch.float32)


def covariance(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Uncentered covariance ``(1/N) sum_t x_t x_t^T`` over the N unmasked rows of ``x``.

    Args:
        x: ``(..., d)`` layer inputs ``a`` or output gradients ``s``, float16/bfloat16/float32/float64.
        mask: optional, shape ``x.shape[:-1]``; masked (padding) rows are excluded from the sum
            and the count.

    Returns:
        ``(d, d)`` in float32 (float64 for float64 input).
    """
    fn = "covariance"
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., d), got a 0-d tensor")
    _check_mask(fn, mask, x.shape[:-1], "x.shape[:-1]")
    check_same_device(fn, x=x, mask=mask)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0 or (_eager_value_checks() and mask is not None and not bool(mask.any())):
        raise ValueError(f"{fn}: no unmasked rows (x has {rows.shape[0]} rows, the mask excludes all of them)")
    path = _path("influence.covariance", x)
    if path == "reference":
        return _finite_or_explain(fn, reference.covariance(x, mask), x=x)
    acc = compute_dtype(x.dtype)
    if path == "triton":
        flat_mask = _float_mask(None if mask is None else mask.reshape(-1), torch.float32)
        total = _covariance_op(rows if rows.stride(-1) == 1 else rows.contiguous(), flat_mask, path)
        count = rows.new_tensor(rows.shape[0], dtype=acc) if mask is None else flat_mask.sum()
    else:
        total, count = _torch.covariance(x, mask)
    return _finite_or_explain(fn, total / count, x=x)


# --------------------------------------------------------------------------------------------------
# eigen_factors
# --------------------------------------------------------------------------------------------------


def eigen_factors(A: Tensor, S: Tensor, *, name: str = "layer") -> Eigen:
    """Symmetrized float64 eigendecompositions of the covariance factors.

    Args:
        A: ``(d_in, d_in)`` activation covariance. S: ``(d_out, d_out)`` gradient covariance.
        name: the layer, named in the error when a statistic holds NaN or Inf.

    Returns:
        `Eigen` (eigenvalues ascending, eigenvectors as columns), float64, on the inputs' device.
    """
    fn = "eigen_factors"
    for arg, M in (("A", A), ("S", S)):
        check_tensor(fn, arg, M, ndim=2, dtypes=FLOAT_DTYPES)
        if M.shape[0] != M.shape[1]:
            raise ValueError(f"{fn}: {name}: {arg} must be square, got shape {tuple(M.shape)}")
    check_same_device(fn, A=A, S=S)
    with eigh_threads(A, S):
        return reference.eigen_factors(A, S, name)


# --------------------------------------------------------------------------------------------------
# lambda_correction and self_scores: one fused kernel over rotated activations and gradients
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::influence_lambda_correction", mutates_args=())
def _lambda_correction_op(a_rot: Tensor, s_rot: Tensor, exact: bool, backend: str) -> Tensor:
    return _triton().gradient_squares(a_rot, s_rot, exact)


@_lambda_correction_op.register_fake
def _(a_rot, s_rot, exact, backend):
    return a_rot.new_empty((s_rot.shape[-1], a_rot.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("pyfast::influence_self_scores", mutates_args=())
def _self_scores_op(a_rot: Tensor, s_rot: Tensor, inverse: Tensor, exact: bool, backend: str) -> Tensor:
    return _triton().weighted_gradient_squares(a_rot, s_rot, inverse, exact)


@_self_scores_op.register_fake
def _(a_rot, s_rot, inverse, exact, backend):
    return a_rot.new_empty((a_rot.shape[0],), dtype=torch.float32)


def _rotate(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, mask: Optional[Tensor]):
    """``(a Q_A, s Q_S)`` in float32 with masked tokens zeroed: the Triton kernels' inputs."""
    a32 = a.float() if mask is None else a.float() * mask.to(torch.float32).unsqueeze(-1)
    return a32 @ Q_A.float(), s.float() @ Q_S.float()


def lambda_correction(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """EK-FAC eigenvalue correction ``Lambda = (1/b) sum_n (Q_S^T G_n Q_A)^2``, ``G_n = sum_t s_{n,t} a_{n,t}^T``,
    without writing the ``(b, d_out, d_in)`` per-example gradients.

    Args:
        a: ``(b, T, d_in)``. s: ``(b, T, d_out)``. Q_A: ``(d_in, d_in)``. Q_S: ``(d_out, d_out)``
            (from `eigen_factors`). mask: optional ``(b, T)``.

    Returns:
        ``(d_out, d_in)`` in float32 (float64 for float64 inputs): the mean over the b examples.
    """
    fn = "lambda_correction"
    _check_activations(fn, a, s, mask)
    _check_basis(fn, "Q_A", Q_A, a.shape[-1])
    _check_basis(fn, "Q_S", Q_S, s.shape[-1])
    check_same_device(fn, a=a, Q_A=Q_A, Q_S=Q_S)
    if a.shape[0] == 0:
        raise ValueError(f"{fn}: a and s hold no examples (shape {tuple(a.shape)}); Lambda is a mean over examples")
    path = _path("influence.lambda_correction", a)
    if path == "reference":
        out = reference.lambda_correction(a, s, Q_A, Q_S, mask)
    elif path == "triton":
        out = _lambda_correction_op(*_rotate(a, s, Q_A, Q_S, mask), a.dtype == torch.float32, path) / a.shape[0]
    else:
        out = _torch.lambda_correction(a, s, Q_A, Q_S, mask)
    return _finite_or_explain(fn, out, a=a, s=s)


def self_scores(
    a: Tensor, s: Tensor, factors: EKFACFactors, *, damping: Optional[float] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Self-influence ``<H^-1 G_n, G_n> = sum_ij (Q_S^T G_n Q_A)_ij^2 / (Lambda_ij + damping)`` per example,
    in the eigenbasis (no back-rotation, no per-example gradients in memory).

    Args:
        a: ``(b, T, d_in)``. s: ``(b, T, d_out)``. factors: `EKFACFactors`.
        damping: > 0; None uses 0.1 x mean(Lambda). mask: optional ``(b, T)``.

    Returns:
        ``(b,)`` in float32 (float64 for float64 inputs).
    """
    fn = "self_scores"
    _check_activations(fn, a, s, mask)
    _check_factors(fn, factors, s.shape[-1], a.shape[-1])
    check_same_device(fn, a=a, Q_A=factors.Q_A)
    damping = _damping(fn, factors, damping)
    path = _path("influence.self_scores", a)
    if path == "reference":
        out = reference.self_scores(a, s, factors, damping, mask)
    elif path == "triton":
        rotated = _rotate(a, s, factors.Q_A, factors.Q_S, mask)
        out = _self_scores_op(*rotated, _inverse(factors, damping).float(), a.dtype == torch.float32, path)
    else:
        out = _torch.self_scores(a, s, factors.Q_A, factors.Q_S, _inverse(factors, damping), mask)
    return _finite_or_explain(fn, out, a=a, s=s)


# --------------------------------------------------------------------------------------------------
# precondition and pairwise_scores
# --------------------------------------------------------------------------------------------------


def precondition(
    V: Tensor, factors: EKFACFactors, *, damping: Optional[float] = None, rank: Optional[int] = None
) -> Union[Tensor, LowRankQuery]:
    """Damped EK-FAC inverse-Hessian product ``Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T``.

    Args:
        V: ``(d_out, d_in)`` or ``(q, d_out, d_in)`` query gradients.
        factors: `EKFACFactors`. damping: > 0; None uses 0.1 x mean(Lambda).
        rank: when given, return the best rank-``rank`` factorization of the result (truncated
            SVD) as a `LowRankQuery` for cheap batched scoring; V must then be 3-D.

    Returns:
        ``V``'s shape in float32 (float64 for float64 V), or a `LowRankQuery` of
        ``left (q, d_out, r)``, ``right (q, r, d_in)``.
    """
    fn = "precondition"
    check_tensor(fn, "V", V, dtypes=FLOAT_DTYPES)
    if V.dim() not in (2, 3) or (rank is not None and V.dim() != 3):
        want = "3-D (queries, d_out, d_in)" if rank is not None else "2-D (d_out, d_in) or 3-D (queries, d_out, d_in)"
        raise ValueError(f"{fn}: V must be {want}, got shape {tuple(V.shape)}")
    d_out, d_in = V.shape[-2:]
    _check_factors(fn, factors, d_out, d_in)
    check_same_device(fn, V=V, Q_A=factors.Q_A)
    damping = _damping(fn, factors, damping)
    if rank is not None:
        check_int(fn, "rank", rank, low=1)
    if _path("influence.precondition", V) == "reference":
        P = reference.precondition(V, factors, damping)
    else:
        P = _torch.precondition(V, factors.Q_A, factors.Q_S, _inverse(factors, damping))
    P = _finite_or_explain(fn, P, V=V)
    return P if rank is None else reference.low_rank(P, rank)


@torch.library.custom_op("pyfast::influence_pairwise_scores", mutates_args=())
def _pairwise_scores_op(a: Tensor, s: Tensor, queries: Tensor, exact: bool, backend: str) -> Tensor:
    return _triton().gradient_inner_products(a, s, queries, exact)


@_pairwise_scores_op.register_fake
def _(a, s, queries, exact, backend):
    return a.new_empty((queries.shape[0], a.shape[0]), dtype=torch.float32)


def _query_shape(fn: str, query) -> tuple:
    """(q, d_out, d_in) of a dense or low-rank query, validated."""
    if isinstance(query, LowRankQuery):
        check_tensor(fn, "query.left", query.left, ndim=3, dims="(queries, d_out, rank)", dtypes=FLOAT_DTYPES)
        check_tensor(fn, "query.right", query.right, ndim=3, dims="(queries, rank, d_in)", dtypes=FLOAT_DTYPES)
        q, d_out, r = query.left.shape
        if query.right.shape[:2] != (q, r):
            raise ValueError(
                f"{fn}: query.right must have shape ({q}, {r}, d_in) to match query.left {tuple(query.left.shape)}, "
                f"got {tuple(query.right.shape)}"
            )
        return q, d_out, query.right.shape[2]
    check_tensor(fn, "query", query, ndim=3, dims="(queries, d_out, d_in)", dtypes=FLOAT_DTYPES)
    return tuple(query.shape)


def pairwise_scores(
    query: Union[Tensor, LowRankQuery], a: Tensor, s: Tensor, *, mask: Optional[Tensor] = None, per_token: bool = False
) -> Tensor:
    """Influence scores ``<P_q, G_n>`` between preconditioned queries and training examples given by
    their layer inputs and output gradients, without per-example gradients in memory (beyond a
    bounded chunk).

    Args:
        query: ``P (q, d_out, d_in)`` from `precondition`, or its `LowRankQuery`.
        a: ``(b, T, d_in)``. s: ``(b, T, d_out)``. mask: optional ``(b, T)``.
        per_token: return per-token scores ``s_t^T P_q a_t`` (they sum over t to the sequence score).

    Returns:
        ``(q, b)``, or ``(q, b, T)`` with ``per_token``; float32 (float64 for float64 ``a``).
    """
    fn = "pairwise_scores"
    _check_activations(fn, a, s, mask)
    q, d_out, d_in = _query_shape(fn, query)
    if (d_out, d_in) != (s.shape[-1], a.shape[-1]):
        raise ValueError(
            f"{fn}: query must be (queries, d_out={s.shape[-1]}, d_in={a.shape[-1]}) to match s and a, "
            f"got (.., {d_out}, {d_in})"
        )
    if isinstance(query, LowRankQuery):
        named = {"query.left": query.left, "query.right": query.right}
    else:
        named = {"query": query}
    check_same_device(fn, a=a, **named)
    return _finite_or_explain(fn, _pairwise_scores(query, a, s, mask, per_token), a=a, s=s, **named)


def _pairwise_scores(query, a: Tensor, s: Tensor, mask: Optional[Tensor], per_token: bool) -> Tensor:
    path = _path("influence.pairwise_scores", a)
    if path == "reference":
        return reference.pairwise_scores(query, a, s, mask, per_token)
    # The fused kernel forms G_n tile by tile; per-token scores and queries whose rank makes the
    # per-token contraction cheaper run the torch code (GEMMs).
    if path == "triton" and not per_token and not _torch.prefers_token_scores(query, a.shape, s.shape[-1]):
        a32 = a.float() if mask is None else a.float() * mask.to(torch.float32).unsqueeze(-1)
        queries = reference.dense_query(query).float().contiguous()
        return _pairwise_scores_op(_unit_last_stride(a32), _unit_last_stride(s.float()), queries, a.dtype == torch.float32, path)
    return _torch.pairwise_scores(query, a, s, mask, per_token)
