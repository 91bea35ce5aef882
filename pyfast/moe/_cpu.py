"""The CPU backend of pyfast.moe: torch glue over the C++ kernels in ``pyfast._C`` (csrc/cpu/moe).

Implements the kernel-backend contract that `ops.py` / `experts.py` dispatch to, except the aux losses
(on the CPU torch's vectorized softmax beat a C++ kernel, so they run the reference). The expert
GEMMs are torch's BLAS on each expert's contiguous rows, between the C++ row gather and combine. Each function allocates the
outputs and passes addresses, sizes, row strides and dtype tags. Inputs arrive validated, with a
unit stride along the last axis and contiguous index tensors (see ops.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _alloc, _ext
from . import activations
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


# --------------------------------------------------------------------------------------------------
# Expert compute: the C++ row gather / combine around per-expert BLAS GEMMs (torch.mm) on the
# contiguous row segment of each expert. 16-bit inputs are computed in float32 (this CPU's
# float32 GEMM is several times faster than its 16-bit one), one expert's weights at a time
# converted into a reused buffer.
# --------------------------------------------------------------------------------------------------


def _segments(counts: Tensor, offsets: Tensor) -> List[Tuple[int, int, int]]:
    """``(expert, first row, end row)`` of every non-empty expert segment."""
    return [(e, s, s + c) for e, (s, c) in enumerate(zip(offsets.tolist(), counts.tolist())) if c]


def _zero_gaps(out: Tensor, segments: List[Tuple[int, int, int]]) -> None:
    """Zero the rows of ``out`` outside the segments (padding, unused tail)."""
    previous = 0
    for _, start, end in segments + [(None, out.shape[0], out.shape[0])]:
        if start > previous:
            out[previous:start].zero_()
        previous = end


class _ExpertWeights:
    """``w[e]`` in the compute dtype; 16-bit weights are converted into one reused buffer."""

    def __init__(self, w: Tensor):
        self.w = w
        acc = compute_dtype(w.dtype)
        self.buffer = None if w.dtype == acc else torch.empty(w.shape[1:], dtype=acc)

    def __getitem__(self, e: int) -> Tensor:
        return self.w[e] if self.buffer is None else self.buffer.copy_(self.w[e])


def _acc(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype))


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a @ b``, written by the GEMM itself when ``out`` has the compute dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def grouped_mm(a: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool) -> Tensor:
    """``(R, N)`` in ``a.dtype``: ``a[r] @ w[e].T`` (``w (E, N, K)``), or ``a[r] @ w[e]``
    (``w (E, K, N)``) when ``trans_w``, on each expert's rows; zero rows elsewhere."""
    n = w.shape[2] if trans_w else w.shape[1]
    out = _alloc.empty((a.shape[0], n), a.dtype, a.device)
    segments = _segments(counts, offsets)
    _zero_gaps(out, segments)
    weight = _ExpertWeights(w)
    for e, start, end in segments:
        we = weight[e]
        _mm_into(out[start:end], _acc(a[start:end]), we if trans_w else we.T)
    return out


def grouped_mm_wgrad(grad: Tensor, a: Tensor, counts: Tensor, offsets: Tensor, num_experts: int, trans_w: bool) -> Tensor:
    """Weight gradient of `grouped_mm`: ``grad_e.T @ a_e`` ``(E, N, K)``, or ``a_e.T @ grad_e``
    ``(E, K, N)`` when ``trans_w``; zero for empty experts. In ``a.dtype``."""
    shape = (num_experts, a.shape[1], grad.shape[1]) if trans_w else (num_experts, grad.shape[1], a.shape[1])
    dw = torch.zeros(shape, dtype=a.dtype, device=a.device)
    for e, start, end in _segments(counts, offsets):
        g, x = _acc(grad[start:end]), _acc(a[start:end])
        if trans_w:
            _mm_into(dw[e], x.T, g)
        else:
            _mm_into(dw[e], g.T, x)
    return dw


def moe_mlp_fwd(
    x: Tensor, w1: Tensor, w2: Tensor, weights: Tensor, row_of_assignment: Tensor, assignment_of_row: Tensor,
    counts: Tensor, offsets: Tensor, activation: str,
) -> Tuple[Tensor, Tensor]:
    """``(out (T, d) x.dtype, hidden (R, H) x.dtype)``; ``hidden`` (the first GEMM's output, zero
    outside the segments) is kept for the backward."""
    k = row_of_assignment.shape[1]
    rows, d = assignment_of_row.shape[0], x.shape[1]
    x_sorted = gather_rows(x, assignment_of_row, k, None)
    hidden = _alloc.empty((rows, w1.shape[1]), x.dtype, x.device)
    y = _alloc.empty((rows, d), x.dtype, x.device)
    segments = _segments(counts, offsets)
    _zero_gaps(hidden, segments)
    _zero_gaps(y, segments)
    if _one_grouped_call(x_sorted, w1, w2):
        # Padding rows of x_sorted are zero and every activation maps 0 to 0, so the padded
        # blocks [offsets[e], offsets[e + 1]) can go through torch._grouped_mm whole.
        used = int(offsets[-1])
        ends = offsets[1:].to(torch.int32)
        hidden[used:].zero_()
        y[used:].zero_()
        hidden[:used] = torch._grouped_mm(x_sorted[:used], w1.transpose(1, 2), offs=ends)
        y[:used] = torch._grouped_mm(activations.apply(hidden[:used], activation), w2.transpose(1, 2), offs=ends)
        return combine_rows(y, row_of_assignment, weights), hidden
    w_up, w_down = _ExpertWeights(w1), _ExpertWeights(w2)
    for e, start, end in segments:
        h = _acc(x_sorted[start:end]) @ w_up[e].T
        hidden[start:end] = h
        _mm_into(y[start:end], activations.apply(h, activation), w_down[e].T)
    return combine_rows(y, row_of_assignment, weights), hidden


def _one_grouped_call(x_sorted: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """torch._grouped_mm (all experts in one call; faster on the CPU than a GEMM per expert) covers
    float32 with row strides that are multiples of 16 bytes."""
    return (
        hasattr(torch, "_grouped_mm")
        and x_sorted.dtype == w1.dtype == w2.dtype == torch.float32
        and all(size % 4 == 0 for size in (x_sorted.shape[1], w1.shape[1], w2.shape[1], w2.shape[2]))
        and w1.is_contiguous()
        and w2.is_contiguous()
    )


def moe_mlp_bwd(
    grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, weights: Tensor, hidden: Tensor,
    row_of_assignment: Tensor, assignment_of_row: Tensor, counts: Tensor, offsets: Tensor, activation: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx (T, d), dw1, dw2, dweights (T, k) compute dtype)`` of `moe_mlp_fwd`.

    Per expert, with g the unweighted output gradient of each row and w its gate weight:
    ``da = g @ w2``; ``dweight = <da, act(h)>``; ``dw2 = g.T @ (w * act(h))``;
    ``dh = act'(h) (w * da)``; ``dw1 = dh.T @ x``; ``dx_row = dh @ w1``, summed back per token.
    """
    tokens, k = row_of_assignment.shape
    acc = compute_dtype(x.dtype)
    g_sorted = gather_rows(grad_out.to(x.dtype), assignment_of_row, k, None)
    x_sorted = gather_rows(x, assignment_of_row, k, None)
    valid = assignment_of_row >= 0
    gate = torch.where(valid, weights.reshape(-1)[assignment_of_row.clamp(min=0)], 0)
    dgate = torch.zeros(assignment_of_row.shape[0], dtype=acc)
    dx_sorted = _alloc.empty(x_sorted.shape, x.dtype, x.device)
    dw1 = torch.zeros(w1.shape, dtype=w1.dtype)
    dw2 = torch.zeros(w2.shape, dtype=w2.dtype)
    w_up, w_down = _ExpertWeights(w1), _ExpertWeights(w2)
    for e, start, end in _segments(counts, offsets):
        h, g, xe = _acc(hidden[start:end]), _acc(g_sorted[start:end]), _acc(x_sorted[start:end])
        wr = gate[start:end, None]
        a = activations.apply(h, activation)
        da = g @ w_down[e]
        dgate[start:end] = (da * a).sum(dim=1)
        _mm_into(dw2[e], g.T, a * wr)
        dh = activations.backward(h, da * wr, activation)
        _mm_into(dw1[e], dh.T, xe)
        _mm_into(dx_sorted[start:end], dh, w_up[e])
    dx = combine_rows(dx_sorted, row_of_assignment, None)
    dweights = torch.zeros(tokens * k, dtype=acc).index_put_((assignment_of_row[valid],), dgate[valid])
    return dx, dw1, dw2, dweights.view(tokens, k)
