"""Power-exponent quantization ops: validation, the ``pyfast::quant_power_linear`` custom op, dispatch.

Quantization, dequantization and the searches are offline steps that run the torch reference
(batched over candidates); `power_linear`, the op on the inference path, dispatches to a kernel
backend (`_cpu.py` over ``pyfast._C``, the Triton launchers in ``pyfast.triton_kernels.quant``) or
the reference when no kernel covers the call (`backend_for` says which and why).
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._backend import backend_for, register_op
from .._checks import FLOAT_DTYPES, check_int, check_tensor, value_checks_enabled
from . import reference
from .reference import DEFAULT_CLIPS, DEFAULT_EXPONENTS, SUPPORTED_BITS, QuantizedTensor, SearchResult

_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
register_op("quant.power_linear", cpu=(torch.float32, torch.float16, torch.bfloat16), triton=_GPU_FLOATS)
_KERNEL_MODULES = {"cpu": "pyfast.quant._cpu", "triton": "pyfast.triton_kernels.quant"}
KERNEL_GROUP_MULTIPLE = 8  # kernels decode blocks of 8 codes; other group sizes run the reference


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


def _eager_value_checks() -> bool:
    return value_checks_enabled() and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# Validation shared by the quantization entry points
# --------------------------------------------------------------------------------------------------


def _check_bits(fn: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn}: bits must be an int, got {type(bits).__name__}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: bits must be one of {SUPPORTED_BITS}, got {bits}")
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


def power_quantize(
    w: Tensor,
    bits: int,
    exponent: float,
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
        exponent: ``a > 0``; 1 is uniform quantization.
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
    exponent = _check_positive(fn, "exponent", exponent)
    axis = _check_weight(fn, w, axis, group_size)
    K = w.shape[axis]
    groups = 1 if group_size is None else K // group_size
    rows = w.numel() // K if K else 0
    if isinstance(clip, Tensor):
        if tuple(clip.shape) != (rows, groups):
            raise ValueError(f"{fn}: clip must be a float or a tensor of shape ({rows}, {groups}) (rows, groups), got {tuple(clip.shape)}")
        if clip.device != w.device:
            raise ValueError(f"{fn}: clip must be on w's device {w.device}, got {clip.device}")
        if _eager_value_checks() and clip.numel() and not bool((clip > 0).all() & torch.isfinite(clip).all()):
            raise ValueError(f"{fn}: clip must hold finite values > 0")
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
    return reference.dequantize(q, dtype)


def search_exponent(
    w: Tensor,
    bits: int,
    *,
    group_size: Optional[int] = 128,
    candidates: Sequence[float] = DEFAULT_EXPONENTS,
    clips: Sequence[float] = DEFAULT_CLIPS,
    x: Optional[Tensor] = None,
    symmetric: bool = True,
) -> SearchResult:
    """Batched joint search of the exponent (per layer) and clip (per group) of a ``(N, K)`` weight.

    Every (exponent, clip) pair is evaluated in one batched pass (row-chunked for memory). The error
    is the weight reconstruction error, or the output error ``||x W^T - x Q(W)^T||^2`` when
    calibration inputs ``x (..., K)`` are given. Returns `SearchResult` ``(exponent, clip (N, groups),
    errors (E,))``; quantize with ``power_quantize(w, bits, r.exponent, clip=r.clip, ...)``.
    Pass ``clips=(1.0,)`` for plain absmax scales.
    """
    fn = "search_exponent"
    _check_bits(fn, bits)
    _check_weight(fn, w, 1, group_size, ndim=2)
    candidates = _check_candidates(fn, "candidates", candidates)
    clips = _check_candidates(fn, "clips", clips)
    if x is not None:
        check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{fn}: x must have last dimension in_features = {w.shape[1]}, got shape {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"{fn}: x must be on w's device {w.device}, got {x.device}")
    return reference.search_exponent(
        w, bits, group_size=group_size, candidates=candidates, clips=clips, x=x, symmetric=symmetric
    )
