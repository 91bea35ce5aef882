"""The CPU backend of pyfast.moe: torch glue over the C++ kernels in ``pyfast._C`` (csrc/cpu/moe).

Implements the kernel-backend contract that `ops.py` dispatches to, except the aux losses (on the
CPU torch's vectorized softmax beat a C++ kernel, so they run the reference). Each function allocates the
outputs and passes addresses, sizes, row strides and dtype tags. Inputs arrive validated, with a
unit stride along the last axis and contiguous index tensors (see ops.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _alloc, _ext
from .reference import compute_dtype

_TAG = _ext.DTYPE_TAG


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _row_stride(t: Tensor) -> int:
    return t.stride(0) if t.dim() == 2 else 0


def topk_gating_fwd(
    logits: Tensor, k: int, softmax: bool, temperature: Tensor, renormalize: bool, bias: Optional[Tensor], check: bool
) -> Tuple[Tensor, Tensor, int]:
    """``(weights (T, k) logits.dtype, experts (T, k) int32, non-finite row count)``."""
    tokens, experts = logits.shape
    weights = _alloc.empty((tokens, k), logits.dtype, logits.device)
    choices = _alloc.empty((tokens, k), torch.int32, logits.device)
    bad = _ext.cpu.moe_topk_gating_fwd(
        _TAG[logits.dtype], logits.data_ptr(), tokens, experts, _row_stride(logits), k, softmax,
        temperature.data_ptr(), renormalize, _address(bias), weights.data_ptr(), choices.data_ptr(), check,
    )
    return weights, choices, bad


def topk_gating_bwd(
    grad_weights: Tensor, logits: Tensor, experts: Tensor, softmax: bool, temperature: Tensor, renormalize: bool
) -> Tensor:
    """``(T, E)`` gradient w.r.t. the logits."""
    tokens, num_experts = logits.shape
    grad = grad_weights.to(compute_dtype(logits.dtype)).contiguous()
    grad_logits = _alloc.empty((tokens, num_experts), logits.dtype, logits.device)
    _ext.cpu.moe_topk_gating_bwd(
        _TAG[logits.dtype], grad.data_ptr(), logits.data_ptr(), tokens, num_experts, _row_stride(logits),
        experts.data_ptr(), experts.shape[1], softmax, temperature.data_ptr(), renormalize, grad_logits.data_ptr(),
    )
    return grad_logits


def route(
    experts: Tensor, num_experts: int, capacity: int, align: int, num_rows: int, check: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(counts (E,), offsets (E+1,), row_of_assignment (T, k), assignment_of_row (R,), bad ids)``."""
    tokens, k = experts.shape
    new = lambda *shape: _alloc.empty(shape, torch.int64, experts.device)  # noqa: E731
    counts, offsets, row_of_assignment, assignment_of_row = new(num_experts), new(num_experts + 1), new(tokens, k), new(num_rows)
    bad = _ext.cpu.moe_route(
        experts.data_ptr(), tokens, k, num_experts, capacity, align, num_rows,
        counts.data_ptr(), offsets.data_ptr(), row_of_assignment.data_ptr(), assignment_of_row.data_ptr(),
    )
    return counts, offsets, row_of_assignment, assignment_of_row, bad if check else 0


def gather_rows(x: Tensor, assignment_of_row: Tensor, k: int, scale: Optional[Tensor]) -> Tensor:
    """``(R, d)``: ``out[r] = scale[a] * x[a // k]``, zero rows where ``a < 0``."""
    rows, d = assignment_of_row.shape[0], x.shape[1]
    out = _alloc.empty((rows, d), x.dtype, x.device)
    _ext.cpu.moe_gather_rows(
        _TAG[x.dtype], x.data_ptr(), d, _row_stride(x), assignment_of_row.data_ptr(), rows, k,
        _address(scale), out.data_ptr(),
    )
    return out


def combine_rows(y: Tensor, row_of_assignment: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``(T, d)``: ``out[t] = sum_j weights[t, j] * y[row(t, j)]``."""
    (tokens, k), d = row_of_assignment.shape, y.shape[1]
    out = _alloc.empty((tokens, d), y.dtype, y.device)
    _ext.cpu.moe_combine_rows(
        _TAG[y.dtype], y.data_ptr(), d, _row_stride(y), row_of_assignment.data_ptr(), tokens, k,
        _address(weights), out.data_ptr(),
    )
    return out


def combine_weights_grad(grad_out: Tensor, y: Tensor, row_of_assignment: Tensor) -> Tensor:
    """``(T, k)`` in the compute dtype: ``<grad_out[t], y[row(t, j)]>``, 0 for dropped assignments."""
    tokens, k = row_of_assignment.shape
    y = y.to(grad_out.dtype)
    grad_weights = _alloc.empty((tokens, k), compute_dtype(y.dtype), y.device)
    _ext.cpu.moe_combine_weights_grad(
        _TAG[y.dtype], grad_out.data_ptr(), _row_stride(grad_out), y.data_ptr(), _row_stride(y), y.shape[1],
        row_of_assignment.data_ptr(), tokens, k, grad_weights.data_ptr(),
    )
    return grad_weights
