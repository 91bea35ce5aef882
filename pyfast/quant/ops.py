"""Power-exponent quantization ops: validation, the ``pyfast::quant_power_linear`` custom op, dispatch.

Quantization, dequantization and the searches are offline steps that run the torch reference
(batched over candidates); `power_linear`, the op on the inference path, dispatches to a kernel
backend (`_cpu.py` over ``pyfast._C``, the Triton launchers in ``pyfast.triton_kernels.quant``) or
the reference when no kernel covers the call (`backend_for` says which and why).
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._backend import backend_for, register_op
from .._checks import FLOAT_DTYPES, check_int, check_tensor, value_checks_enabled
from . import reference
from .reference import DEFAULT_CLIPS, DEFAULT_EXPONENTS, MAX_GROUP_EXPONENTS, SUPPORTED_BITS, QuantizedTensor, SearchResult

_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
register_op("quant.power_linear", cpu=_GPU_FLOATS, triton=_GPU_FLOATS)
register_op("quant.dequantize", cpu=_GPU_FLOATS, triton=_GPU_FLOATS)
_KERNEL_MODULES = {"cpu": "pyfast.quant._cpu", "triton": "pyfast.triton_kernels.quant"}
KERNEL_GROUP_MULTIPLE = 8  # kernels decode blocks of 8 codes; other group sizes run the reference


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


def _eager_value_checks() -> bool:
    return value_checks_enabled() and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# Validation shared by the quantization entry points
# --------------------------------------------------------------------------------------------------


def _check_bits(fn: str, bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(bits).__name__}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: {name} must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def _check_positive(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value}")
    return float(value)


def _check_weight(fn: str, w, axis: int, group_size: Optional[int], ndim: Optional[int] = None) -> int:
    """Validates ``w`` and the grouping; returns the non-negative axis."""
    check_tensor(fn, "w", w, ndim=ndim, dims="(out_features, in_features)" if ndim == 2 else "", dtypes=FLOAT_DTYPES)
    if w.dim() == 0:
        raise ValueError(f"{fn}: w must have at least one dimension, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int, got {type(axis).__name__}")
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"{fn}: axis must be in [{-w.dim()}, {w.dim() - 1}] for w of shape {tuple(w.shape)}, got {axis}")
    axis %= w.dim()
    K = w.shape[axis]
    if group_size is not None:
        check_int(fn, "group_size", group_size, low=1)
        if K % group_size:
            raise ValueError(
                f"{fn}: group_size must divide w.shape[{axis}] = {K} (no padding; use group_size=None "
                f"for one group per row), got {group_size}"
            )
    if _eager_value_checks() and w.numel() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{fn}: w has {bad} non-finite value(s) (NaN or Inf)")
    return axis


def _check_candidates(fn: str, name: str, values) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"{fn}: {name} must not be empty")
    return tuple(_check_positive(fn, f"every entry of {name}", v) for v in values)


# --------------------------------------------------------------------------------------------------
# Quantization (reference math, validated)
# --------------------------------------------------------------------------------------------------


def _check_group_tensor(fn: str, name: str, value: Tensor, w: Tensor, rows: int, groups: int) -> None:
    """A per-group ``(rows, groups)`` tensor argument (clip, exponent): shape, device, finite > 0."""
    if tuple(value.shape) != (rows, groups):
        raise ValueError(f"{fn}: {name} must be a float or a tensor of shape ({rows}, {groups}) (rows, groups), got {tuple(value.shape)}")
    if value.device != w.device:
        raise ValueError(f"{fn}: {name} must be on w's device {w.device}, got {value.device}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating tensor, got {value.dtype}")
    if _eager_value_checks() and value.numel() and not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"{fn}: {name} must hold finite values > 0")


def power_quantize(
    w: Tensor,
    bits: int,
    exponent: Union[float, Tensor],
    *,
    group_size: Optional[int] = 128,
    axis: int = -1,
    symmetric: bool = True,
    clip: Union[float, Tensor] = 1.0,
) -> QuantizedTensor:
    """Quantize ``w`` onto the power grid ``sign(t)|t|^(1/exponent)`` (grid, ties and packing: see
    `pyfast.quant.reference`).

    Args:
        w: float tensor of any shape (float32/float16/bfloat16/float64), finite.
        bits: 3, 4 or 8.
        exponent: ``a > 0``; 1 is uniform quantization. A float (one exponent, the fast path), or a
            ``(rows, groups)`` tensor of per-group exponents (e.g. ``search_exponent(...,
            per_group=True).exponent``) with at most 256 distinct values.
        group_size: elements per scale along ``axis`` (must divide that dimension), or None for one
            group per row.
        axis: the grouped axis (for a Linear weight ``(N, K)``, -1: groups along the inputs).
        symmetric: True for the symmetric 2**bits-level grid, False for the grid with exact zero.
        clip: scale = clip * group absmax: a float > 0, or a ``(rows, groups)`` tensor (e.g.
            ``search_exponent(...).clip``).

    Returns:
        `QuantizedTensor` with packed uint8 codes and float32 scales (float64 for float64 ``w``).
    """
    fn = "power_quantize"
    _check_bits(fn, bits)
    if not isinstance(exponent, Tensor):
        exponent = _check_positive(fn, "exponent", exponent)
    axis = _check_weight(fn, w, axis, group_size)
    K = w.shape[axis]
    groups = 1 if group_size is None else K // group_size
    rows = w.numel() // K if K else 0
    if isinstance(exponent, Tensor):
        _check_group_tensor(fn, "exponent", exponent, w, rows, groups)
        distinct = int(torch.unique(exponent).numel())
        if distinct > MAX_GROUP_EXPONENTS:
            raise ValueError(f"{fn}: exponent must hold at most {MAX_GROUP_EXPONENTS} distinct values, got {distinct}")
    if isinstance(clip, Tensor):
        _check_group_tensor(fn, "clip", clip, w, rows, groups)
    else:
        clip = _check_positive(fn, "clip", clip)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{fn}: symmetric must be a bool, got {type(symmetric).__name__}")
    return reference.power_quantize(w, bits, exponent, group_size=group_size, axis=axis, symmetric=symmetric, clip=clip)


def _check_quantized(fn: str, q) -> QuantizedTensor:
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{fn}: q must be a QuantizedTensor (from power_quantize), got {type(q).__name__}")
    return q


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The tensor of ``q.shape`` (in ``dtype``, default the scales' dtype) that ``q`` stores."""
    _check_quantized("dequantize", q)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be a floating dtype, got {dtype}")
    out_dtype = q.scales.dtype if dtype is None else dtype
    # The kernels decode Linear-weight layouts: 2-D, grouped along the last axis.
    if len(q.shape) != 2 or q.axis != 1 or 0 in q.shape:
        return reference.dequantize(q, dtype)
    backend = _kernel_backend("quant.dequantize", torch.empty(0, dtype=out_dtype, device=q.device), q)
    if backend == "reference":
        return reference.dequantize(q, dtype)
    N, K = q.shape
    return _dequantize_op(q.codes.contiguous(), q.scales.float().contiguous(), _kernel_table(q), _table_index(q), q.bits,
                          q.group_size, K, out_dtype, backend)


def search_exponent(
    w: Tensor,
    bits: int,
    *,
    group_size: Optional[int] = 128,
    candidates: Sequence[float] = DEFAULT_EXPONENTS,
    clips: Sequence[float] = DEFAULT_CLIPS,
    x: Optional[Tensor] = None,
    symmetric: bool = True,
    per_group: bool = False,
) -> SearchResult:
    """Batched joint search of the exponent (per layer, or per group) and clip (per group) of a ``(N, K)`` weight.

    Every (exponent, clip) pair is evaluated in one batched pass (row-chunked for memory). The error
    is the weight reconstruction error, or the output error ``||x W^T - x Q(W)^T||^2`` when
    calibration inputs ``x (..., K)`` are given. Returns `SearchResult` ``(exponent, clip (N, groups),
    errors (E,))``; quantize with ``power_quantize(w, bits, r.exponent, clip=r.clip, ...)``.
    Pass ``clips=(1.0,)`` for plain absmax scales. ``per_group=True``: ``exponent`` is a
    ``(N, groups)`` float64 tensor, each group's best candidate from the same pass (with ``x``
    scored by the diagonal of ``x^T x``, the part of the output error that separates by group).
    """
    fn = "search_exponent"
    _check_bits(fn, bits)
    _check_weight(fn, w, 1, group_size, ndim=2)
    candidates = _check_candidates(fn, "candidates", candidates)
    clips = _check_candidates(fn, "clips", clips)
    if not isinstance(per_group, bool):
        raise TypeError(f"{fn}: per_group must be a bool, got {type(per_group).__name__}")
    if per_group and len(set(candidates)) > MAX_GROUP_EXPONENTS:
        raise ValueError(f"{fn}: per_group=True takes at most {MAX_GROUP_EXPONENTS} distinct candidates, got {len(set(candidates))}")
    if x is not None:
        check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{fn}: x must have last dimension in_features = {w.shape[1]}, got shape {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"{fn}: x must be on w's device {w.device}, got {x.device}")
    return reference.search_exponent(
        w, bits, group_size=group_size, candidates=candidates, clips=clips, x=x, symmetric=symmetric, per_group=per_group
    )


def search_activation_exponent(
    x: Tensor, bits: int, *, candidates: Sequence[float] = DEFAULT_EXPONENTS
) -> float:
    """The exponent of `power_linear`'s activation fake quantization that minimizes
    ``||fq(x) - x||^2`` over calibration activations ``x (..., K)``: `search_exponent` with one group
    per row (the per-token scale), clip 1 and the grid with an exact zero, all candidates in one pass."""
    fn = "search_activation_exponent"
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension, got a scalar")
    return search_exponent(x.reshape(-1, x.shape[-1]), bits, group_size=None, candidates=candidates, clips=(1.0,),
                           symmetric=False).exponent


# --------------------------------------------------------------------------------------------------
# power_linear: y = x W^T with W decoded from the packed codes inside the kernel
# --------------------------------------------------------------------------------------------------


# The kernels' weight arguments: codes (N, row_bytes) uint8, scales (N, groups) float32, table
# (2**bits,) float32 or (E, 2**bits) with table_index (N, groups) uint8 choosing each group's row.
@torch.library.custom_op("pyfast::quant_power_linear", mutates_args=())
def _power_linear_op(
    x: Tensor, codes: Tensor, scales: Tensor, table: Tensor, table_index: Optional[Tensor], bits: int, group_size: int,
    backend: str,
) -> Tensor:
    return _kernels(backend).power_linear_fwd(x, codes, scales, table, table_index, bits, group_size)


@_power_linear_op.register_fake
def _(x, codes, scales, table, table_index, bits, group_size, backend):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("pyfast::quant_dequantize", mutates_args=())
def _dequantize_op(
    codes: Tensor, scales: Tensor, table: Tensor, table_index: Optional[Tensor], bits: int, group_size: int, cols: int,
    dtype: torch.dtype, backend: str,
) -> Tensor:
    return _kernels(backend).dequantize(codes, scales, table, table_index, bits, group_size, cols, dtype)


@_dequantize_op.register_fake
def _(codes, scales, table, table_index, bits, group_size, cols, dtype, backend):
    return codes.new_empty((codes.shape[0], cols), dtype=dtype)


def _power_linear_setup(ctx, inputs, output):
    x, codes, scales, table, table_index, bits, group_size, backend = inputs
    ctx.save_for_backward(codes, scales, table, table_index)
    ctx.bits, ctx.group_size, ctx.cols, ctx.backend = bits, group_size, x.shape[1], backend


def _power_linear_backward(ctx, grad_y):
    # dL/dx = dL/dy W. The weight is frozen storage: codes, scales and table get no gradient
    # (NUPES calibration differentiates the reference's fake quantization instead).
    codes, scales, table, table_index = ctx.saved_tensors
    w = _dequantize_op(codes, scales, table, table_index, ctx.bits, ctx.group_size, ctx.cols, torch.float32, ctx.backend)
    grad_x = (grad_y.float() @ w).to(grad_y.dtype)
    return grad_x, None, None, None, None, None, None, None


_power_linear_op.register_autograd(_power_linear_backward, setup_context=_power_linear_setup)


def _check_linear_weight(fn: str, q) -> QuantizedTensor:
    _check_quantized(fn, q)
    if len(q.shape) != 2 or q.axis != 1:
        raise ValueError(
            f"{fn}: q must be a quantized Linear weight (out_features, in_features) grouped along axis 1, "
            f"got shape {q.shape} grouped along axis {q.axis}"
        )
    return q


@functools.lru_cache(maxsize=256)
def _cached_table(bits: int, exponent, symmetric: bool, device: torch.device) -> Tensor:
    return reference.grid_table(bits, exponent, symmetric, torch.float32, device)


def _kernel_table(q: QuantizedTensor) -> Tensor:
    """``q.table()`` in float32, cached per grid in eager mode (the kernels only read it; computing
    the levels in float64 costs tens of microseconds per call, as much as a small GEMV)."""
    if torch.compiler.is_compiling():
        return q.table()
    return _cached_table(q.bits, q.exponent, q.symmetric, q.device)


def _table_index(q: QuantizedTensor) -> Optional[Tensor]:
    return None if q.exponent_index is None else q.exponent_index.contiguous()


def _kernel_backend(op: str, x: Tensor, q: QuantizedTensor) -> str:
    """Backend for this call; group sizes the kernels do not decode go to the reference."""
    if q.group_size % KERNEL_GROUP_MULTIPLE:
        return "reference"
    return backend_for(op, x).backend


def check_activation_quant(fn: str, act_bits, act_exponent) -> None:
    """Validates the activation fake-quantization arguments (``act_bits`` None: off)."""
    if act_bits is not None:
        _check_bits(fn, act_bits, "act_bits")
        _check_positive(fn, "act_exponent", act_exponent)


def power_linear(x: Tensor, q: QuantizedTensor, *, act_bits: Optional[int] = None, act_exponent: float = 1.0) -> Tensor:
    """``y = x W^T`` with ``W = dequantize(q)`` decoded on the fly (never materialized for few rows).

    Args:
        x: ``(..., K)`` float32/float16/bfloat16/float64 activations.
        q: a `QuantizedTensor` of a ``(N, K)`` weight grouped along K (``power_quantize(w, ...)``
            with the default ``axis=-1``), on x's device.
        act_bits: None, or 3/4/8 to fake-quantize x first (W4A8-style evaluation): per-token
            dynamic scale ``max|x_row|``, the grid with an exact zero and exponent ``act_exponent``
            (`pyfast.quant.reference.quantize_activations`), gradient by the straight-through
            estimator (identity). Quantization runs in torch before the kernel.
        act_exponent: the activations' exponent (> 0; 1 is uniform; see `search_activation_exponent`).

    Returns:
        ``(..., N)`` in x.dtype, accumulated in float32 (float64 for float64 x). Differentiable
        w.r.t. x; the quantized weight is frozen (no gradient to codes or scales).
    """
    fn = "power_linear"
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    _check_linear_weight(fn, q)
    check_activation_quant(fn, act_bits, act_exponent)
    N, K = q.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"{fn}: x must have last dimension in_features = {K}, got shape {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{fn}: q is on {q.device} but x is on {x.device}; move it with q.to(x.device)")
    if act_bits is not None:
        x = reference.straight_through(x, reference.quantize_activations(x, act_bits, act_exponent))
    backend = _kernel_backend("quant.power_linear", x, q)
    if backend == "reference":
        return reference.power_linear(x, q)
    x2 = x.reshape(-1, K)
    if x2.shape[0] and K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = _power_linear_op(x2, q.codes.contiguous(), q.scales.float().contiguous(), _kernel_table(q), _table_index(q), q.bits,
                         q.group_size, backend)
    return y.reshape(*x.shape[:-1], N)
