"""Kronecker matrix-vector products: validation, `torch.library` custom ops, autograd, dispatch.

Backends: ``triton`` (CUDA, float32/float16/bfloat16: the strided batched-GEMM mode-product
kernel), ``cpu`` (square float32/float64 factors: the C++ Kronecker kernel,
`_modes.kron_eigen_apply`, one output buffer and three passes over a 64^3 grid; otherwise
torch's GEMMs on mode views without permute copies, `_modes.kron_apply`, which also serves
float64 on CUDA) and ``reference`` (dense Kronecker product, `reference.py`).
"""
from __future__ import annotations

import importlib
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .._backend import backend_for, get_backend, register_op
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from . import _modes, reference

_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MODE_VIEWS = "torch GEMMs on views of each mode (no permute copies)"
register_op("gp.kron_mv", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS,
            cpu_path="C++ Kronecker kernel for square float32/float64 factors, else " + _MODE_VIEWS)
register_op("gp.mode_product", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS, cpu_path=_MODE_VIEWS)


def _apply(backend: str):
    """The mode-product function of ``backend`` (``torch`` runs `_modes.apply_mode`)."""
    if backend == "triton":
        return importlib.import_module("pyfast.triton_kernels.gp").apply_mode
    return _modes.apply_mode


def _choose(op: str, tensor: Tensor) -> str:
    """``reference`` when requested, ``triton`` when it covers the call, else the torch GEMM path."""
    if get_backend() == "reference":
        return "reference"
    return "triton" if backend_for(op, tensor).backend == "triton" else "torch"


def check_factors(fn: str, factors, v: Tensor, name: str = "factors", square: bool = False) -> List[Tensor]:
    """A non-empty sequence of 2-D tensors with ``v``'s dtype and device."""
    if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise TypeError(f"{fn}: {name} must be a non-empty list or tuple of 2-D tensors, got {type(factors).__name__}")
    for d, f in enumerate(factors):
        check_tensor(fn, f"{name}[{d}]", f, ndim=2, dims="(m_d, n_d)", dtypes=FLOAT_DTYPES)
        if f.dtype != v.dtype:
            raise TypeError(f"{fn}: {name}[{d}] has dtype {f.dtype} but the grid vector has {v.dtype}")
        if square and f.shape[0] != f.shape[1]:
            raise ValueError(f"{fn}: {name}[{d}] must be square, got shape {tuple(f.shape)}")
        check_same_device(fn, **{f"{name}[{d}]": f, "v": v})
    return list(factors)


def check_grid_vector(fn: str, name: str, v, rows: int, what: str) -> None:
    """``v`` is ``(rows,)`` or ``(rows, B)``."""
    check_tensor(fn, name, v, dtypes=FLOAT_DTYPES)
    if v.dim() not in (1, 2) or v.shape[0] != rows:
        raise ValueError(f"{fn}: {name} must have shape ({rows},) or ({rows}, B) ({what}), got {tuple(v.shape)}")


def _as_matrix(v: Tensor) -> Tensor:
    return (v.unsqueeze(1) if v.dim() == 1 else v).contiguous()


# --------------------------------------------------------------------------------------------------
# kron_mv
# --------------------------------------------------------------------------------------------------


def _oriented(factors: Sequence[Tensor], transpose: bool) -> List[Tensor]:
    return [f.t() if transpose else f for f in factors]


def _grid_of(factors: Sequence[Tensor]) -> List[int]:
    """Sizes of the grid the (oriented) factors act on."""
    return [f.shape[1] for f in factors]


@torch.library.custom_op("pyfast::gp_kron_mv", mutates_args=())
def _kron_mv_op(factors: List[Tensor], v: Tensor, transpose: bool, backend: str) -> Tensor:
    mats = _oriented(factors, transpose)
    if backend == "torch" and _modes.kernel_covers(v, mats):
        return _modes.kron_eigen_apply([m.contiguous() for m in mats], [m.t().contiguous() for m in mats], v,
                                       rotate_in=False, rotate_out=True)
    return _modes.kron_apply(mats, v, _grid_of(mats), v.shape[1], apply=_apply(backend))


@_kron_mv_op.register_fake
def _(factors, v, transpose, backend):
    rows = math.prod([f.shape[1 if transpose else 0] for f in factors])
    return v.new_empty((rows, v.shape[1]))


@torch.library.custom_op("pyfast::gp_kron_mv_factor_grads", mutates_args=())
def _kron_mv_factor_grads_op(factors: List[Tensor], v: Tensor, grad: Tensor, transpose: bool, backend: str) -> List[Tensor]:
    # out = (M_1 (x) ... (x) M_D) v, so dL/dM_d = unfold_d(grad) unfold_d(M_{-d} v)^T with M_{-d} v
    # every factor but the d-th applied to v.
    mats = _oriented(factors, transpose)
    grid, cols = _grid_of(mats), v.shape[1]
    out_grid = [m.shape[0] for m in mats]
    grads = []
    for d in range(len(mats)):
        others = _modes.kron_apply(mats, v, grid, cols, skip=d, apply=_apply(backend))
        g = _modes.mode_gram(grad, others, out_grid, d, cols, *mats[d].shape)
        grads.append(g.t().contiguous() if transpose else g)
    return grads


@_kron_mv_factor_grads_op.register_fake
def _(factors, v, grad, transpose, backend):
    return [torch.empty_like(f) for f in factors]


def _kron_mv_setup(ctx, inputs, output):
    factors, v, transpose, backend = inputs
    ctx.save_for_backward(v, *factors)
    ctx.transpose, ctx.backend = transpose, backend


def _kron_mv_backward(ctx, grad):
    v, *factors = ctx.saved_tensors
    grad = grad.contiguous()
    grad_v = _kron_mv_op(factors, grad, not ctx.transpose, ctx.backend) if ctx.needs_input_grad[1] else None
    grad_factors = None
    if ctx.needs_input_grad[0]:
        grad_factors = _kron_mv_factor_grads_op(factors, v, grad, ctx.transpose, ctx.backend)
    return grad_factors, grad_v, None, None


_kron_mv_op.register_autograd(_kron_mv_backward, setup_context=_kron_mv_setup)


def kron_mv(factors: Sequence[Tensor], v: Tensor, *, transpose: bool = False) -> Tensor:
    """``(K_1 (x) ... (x) K_D) v`` without forming the product or copying between modes.

    Args:
        factors: ``D >= 1`` matrices ``K_d (m_d, n_d)`` (any sizes), float dtype of ``v``.
        v: ``(n_1 ... n_D,)`` or ``(n_1 ... n_D, B)``: one or ``B`` grid vectors, row-major grid
            (the last mode varies fastest, as in ``torch.kron``).
        transpose: apply ``K_1^T (x) ... (x) K_D^T`` (then ``v`` has ``m_1 ... m_D`` rows).

    Returns:
        ``(m_1 ... m_D,)`` or ``(m_1 ... m_D, B)`` in ``v.dtype``; differentiable w.r.t. ``v`` and
        every factor.
    """
    fn = "kron_mv"
    check_tensor(fn, "v", v, dtypes=FLOAT_DTYPES)
    factors = check_factors(fn, factors, v)
    rows = math.prod([f.shape[0 if transpose else 1] for f in factors])
    check_grid_vector(fn, "v", v, rows, "the product of the factors' " + ("row" if transpose else "column") + " counts")
    backend = _choose("gp.kron_mv", v)
    if backend == "reference":
        return reference.kron_mv(factors, v, transpose=transpose)
    out = _kron_mv_op(factors, _as_matrix(v), transpose, backend)
    return out.squeeze(1) if v.dim() == 1 else out


# --------------------------------------------------------------------------------------------------
# mode_product: one operator along one mode (derivative operators K''_d K_d^{-1})
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::gp_mode_product", mutates_args=())
def _mode_product_op(matrix: Tensor, v: Tensor, grid: List[int], mode: int, transpose: bool, backend: str) -> Tensor:
    mat = matrix.t() if transpose else matrix
    return _apply(backend)(mat, v, grid, mode, v.shape[1])


@_mode_product_op.register_fake
def _(matrix, v, grid, mode, transpose, backend):
    m = matrix.shape[1 if transpose else 0]
    return v.new_empty((v.shape[0] // grid[mode] * m, v.shape[1]))


def _mode_product_setup(ctx, inputs, output):
    matrix, v, grid, mode, transpose, backend = inputs
    ctx.save_for_backward(matrix, v)
    ctx.grid, ctx.mode, ctx.transpose, ctx.backend = grid, mode, transpose, backend


def _mode_product_backward(ctx, grad):
    matrix, v = ctx.saved_tensors
    grad = grad.contiguous()
    out_grid = list(ctx.grid)
    out_grid[ctx.mode] = matrix.shape[1 if ctx.transpose else 0]
    grad_v = grad_m = None
    if ctx.needs_input_grad[1]:
        grad_v = _mode_product_op(matrix, grad, out_grid, ctx.mode, not ctx.transpose, ctx.backend)
    if ctx.needs_input_grad[0]:
        g = _modes.mode_gram(grad, v, out_grid, ctx.mode, v.shape[1], out_grid[ctx.mode], ctx.grid[ctx.mode])
        grad_m = g.t() if ctx.transpose else g
    return grad_m, grad_v, None, None, None, None


_mode_product_op.register_autograd(_mode_product_backward, setup_context=_mode_product_setup)


def _check_grid(fn: str, grid) -> Tuple[int, ...]:
    if not isinstance(grid, (list, tuple, torch.Size)) or len(grid) == 0:
        raise TypeError(f"{fn}: grid must be a non-empty list or tuple of sizes, got {grid!r}")
    for d, n in enumerate(grid):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{fn}: grid[{d}] must be a non-negative int, got {n!r}")
    return tuple(grid)


def mode_product(matrix: Tensor, v: Tensor, grid: Sequence[int], mode: int, *, transpose: bool = False) -> Tensor:
    """Apply ``matrix`` along one axis of a grid: ``(I (x) ... (x) M (x) ... (x) I) v``.

    Args:
        matrix: ``(m, grid[mode])`` (``(grid[mode], m)`` with ``transpose``), ``v``'s dtype.
        v: ``(prod grid,)`` or ``(prod grid, B)``, row-major grid.
        grid: the grid sizes ``(n_1, ..., n_D)``.
        mode: the axis, ``0 <= mode < D``.

    Returns:
        ``v`` with axis ``mode`` replaced by ``m``: ``(prod grid / n_mode * m[, B])``.
    """
    fn = "mode_product"
    grid = _check_grid(fn, grid)
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < len(grid):
        raise ValueError(f"{fn}: mode must be an int in [0, {len(grid)}), got {mode!r}")
    check_tensor(fn, "v", v, dtypes=FLOAT_DTYPES)
    check_factors(fn, [matrix], v, name="matrix")
    n_in = matrix.shape[0 if transpose else 1]
    if n_in != grid[mode]:
        raise ValueError(
            f"{fn}: matrix{'^T' if transpose else ''} must have {grid[mode]} columns (grid[{mode}]), "
            f"got shape {tuple(matrix.shape)}"
        )
    check_grid_vector(fn, "v", v, math.prod(grid), f"grid {grid}")
    backend = _choose("gp.mode_product", v)
    if backend == "reference":
        return reference.mode_product(matrix, v, grid, mode, transpose=transpose)
    out = _mode_product_op(matrix, _as_matrix(v), list(grid), mode, transpose, backend)
    return out.squeeze(1) if v.dim() == 1 else out
