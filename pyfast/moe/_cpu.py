"""The CPU backend of pyfast.moe: torch glue over the C++ kernels in ``pyfast._C`` (csrc/cpu/moe).

Implements the kernel-backend contract that `ops.py` / `experts.py` dispatch to, except the
load-balancing loss (torch's softmax and mean beat a C++ pass there, so it runs the reference). The
expert GEMMs that produce rows are the C++ grouped GEMM (float32/16-bit on AVX2 CPUs; torch's BLAS per
expert otherwise), the expert weight gradients torch's BLAS per expert, the activations torch.
Each function allocates the outputs and passes addresses, sizes, row strides and dtype tags.
Inputs arrive validated, with a unit stride along the last axis and contiguous index tensors (see
ops.py).
"""
from __future__ import annotations

import functools
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


def router_z_loss_fwd(logits: Tensor) -> Tensor:
    tokens, num_experts = logits.shape
    if tokens == 0:
        return torch.zeros((), dtype=compute_dtype(logits.dtype))
    total = _ext.cpu.moe_router_lse_square_sum(_TAG[logits.dtype], logits.data_ptr(), tokens, num_experts, _row_stride(logits))
    return torch.tensor(total / tokens, dtype=compute_dtype(logits.dtype))


def router_z_loss_bwd(grad: Tensor, logits: Tensor) -> Tensor:
    tokens, num_experts = logits.shape
    grad_logits = _alloc.empty((tokens, num_experts), logits.dtype, logits.device)
    if tokens == 0:
        return grad_logits
    scale = (grad.to(compute_dtype(logits.dtype)) * 2 / tokens).reshape(())
    _ext.cpu.moe_router_z_loss_bwd(
        _TAG[logits.dtype], logits.data_ptr(), tokens, num_experts, _row_stride(logits), scale.data_ptr(),
        grad_logits.data_ptr(),
    )
    return grad_logits


# --------------------------------------------------------------------------------------------------
# Expert compute. The GEMMs that produce rows (forward, and the input gradients of the backward)
# run the C++ grouped GEMM (csrc/cpu/moe/expert_gemm.cpp: AVX2 + FMA, float32 compute, the row
# gather fused into its packing). float64, and CPUs without AVX2, use torch's BLAS on each
# expert's contiguous rows. The weight gradients are torch's BLAS per expert.
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _has_expert_gemm() -> bool:
    return _ext.cpu.moe_expert_gemm_available()


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


def _expert_gemm(
    a: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool, gather: Optional[Tensor] = None, k: int = 1
) -> Tensor:
    """``(R, N)`` in ``a.dtype``: on expert e's rows, row ``r`` times ``w[e].T`` (``w (E, N, K)``) or
    ``w[e]`` (``w (E, K, N)``, ``trans_w``); zero rows elsewhere. Row ``r`` is ``a[r]``, or with
    ``gather`` (assignment_of_row, ``R`` entries) the token row ``a[gather[r] // k]`` (zero where
    ``gather[r] < 0``)."""
    n_axis, k_axis = (2, 1) if trans_w else (1, 2)
    rows = a.shape[0] if gather is None else gather.shape[0]
    if a.dtype == torch.float64 or not _has_expert_gemm():
        return _torch_expert_gemm(a if gather is None else gather_rows(a, gather, k, None), w, counts, offsets, trans_w)
    out = _alloc.empty((rows, w.shape[n_axis]), a.dtype, a.device)
    _ext.cpu.moe_expert_gemm(
        _TAG[a.dtype], a.data_ptr(), _row_stride(a), _address(gather), k, w.data_ptr(), w.stride(0),
        w.stride(n_axis), w.stride(k_axis), w.shape[n_axis], w.shape[k_axis], counts.data_ptr(), offsets.data_ptr(),
        w.shape[0], rows, out.data_ptr(), out.stride(0),
    )
    return out


def _torch_expert_gemm(a: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool) -> Tensor:
    """`_expert_gemm` without the gather by torch's BLAS, one GEMM per expert."""
    out = _alloc.empty((a.shape[0], w.shape[2] if trans_w else w.shape[1]), a.dtype, a.device)
    segments = _segments(counts, offsets)
    _zero_gaps(out, segments)
    weight = _ExpertWeights(w)
    for e, start, end in segments:
        we = weight[e]
        _mm_into(out[start:end], _acc(a[start:end]), we if trans_w else we.T)
    return out


def grouped_mm(a: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool) -> Tensor:
    """``(R, N)`` in ``a.dtype``: ``a[r] @ w[e].T`` (``w (E, N, K)``), or ``a[r] @ w[e]``
    (``w (E, K, N)``) when ``trans_w``, on each expert's rows; zero rows elsewhere."""
    return _expert_gemm(a, w, counts, offsets, trans_w)


def _expert_grads(shape: Tuple[int, ...], dtype: torch.dtype, segments: List[Tuple[int, int, int]]) -> Tensor:
    """Per-expert weight gradients to be written expert by expert: zero for the experts without
    rows (no zero-fill pass over the others). Huge pages make the first touch of these large
    buffers (GB at full model width) several times cheaper."""
    dw = _alloc.empty(shape, dtype, "cpu")
    _ext.cpu.moe_advise_huge_pages(dw.data_ptr(), dw.numel() * dw.element_size())
    for e in sorted(set(range(shape[0])) - {e for e, _, _ in segments}):
        dw[e].zero_()
    return dw


def grouped_mm_wgrad(grad: Tensor, a: Tensor, counts: Tensor, offsets: Tensor, num_experts: int, trans_w: bool) -> Tensor:
    """Weight gradient of `grouped_mm`: ``grad_e.T @ a_e`` ``(E, N, K)``, or ``a_e.T @ grad_e``
    ``(E, K, N)`` when ``trans_w``; zero for empty experts. In ``a.dtype``."""
    shape = (num_experts, a.shape[1], grad.shape[1]) if trans_w else (num_experts, grad.shape[1], a.shape[1])
    segments = _segments(counts, offsets)
    dw = _expert_grads(shape, a.dtype, segments)
    for e, start, end in segments:
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
    outside the segments) is kept for the backward. The first GEMM reads the token rows of x
    directly (no permuted copy); 16-bit activations are computed in float32 and rounded once."""
    k = row_of_assignment.shape[1]
    hidden = _expert_gemm(x, w1, counts, offsets, False, assignment_of_row, k)
    a = activations.apply(_acc(hidden), activation).to(x.dtype)
    y = _expert_gemm(a, w2, counts, offsets, False)
    return combine_rows(y, row_of_assignment, weights), hidden


def moe_mlp_bwd(
    grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, weights: Tensor, hidden: Tensor,
    row_of_assignment: Tensor, assignment_of_row: Tensor, counts: Tensor, offsets: Tensor, activation: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx (T, d), dw1, dw2, dweights (T, k) compute dtype)`` of `moe_mlp_fwd`.

    With g the unweighted output gradient of each row and w its gate weight:
    ``da = g @ w2``; ``dweight = <da, act(h)>``; ``dh = act'(h) (w * da)``; ``dx_row = dh @ w1``,
    summed back per token (grouped GEMMs over all rows); per expert ``dw2 = g.T @ (w * act(h))``
    and ``dw1 = dh.T @ x``.
    """
    tokens, k = row_of_assignment.shape
    acc = compute_dtype(x.dtype)
    grad_out = grad_out.to(x.dtype)
    valid = assignment_of_row >= 0
    gate = torch.where(valid, weights.reshape(-1)[assignment_of_row.clamp(min=0)], 0)[:, None].to(acc)
    h = _acc(hidden)
    a = activations.apply(h, activation)
    da = _acc(_expert_gemm(grad_out, w2, counts, offsets, True, assignment_of_row, k))
    dgate = (da * a).sum(dim=1)
    dh = activations.backward(h, da * gate, activation)
    dx = combine_rows(_expert_gemm(dh.to(x.dtype), w1, counts, offsets, True), row_of_assignment, None)
    g_sorted = gather_rows(grad_out, assignment_of_row, k, None)
    x_sorted = gather_rows(x, assignment_of_row, k, None)
    aw = a.mul_(gate)  # a is fresh and dgate already read it
    segments = _segments(counts, offsets)
    dw1, dw2 = _expert_grads(w1.shape, w1.dtype, segments), _expert_grads(w2.shape, w2.dtype, segments)
    for e, start, end in segments:
        _mm_into(dw2[e], _acc(g_sorted[start:end]).T, aw[start:end])
        _mm_into(dw1[e], dh[start:end].T, _acc(x_sorted[start:end]))
    dweights = torch.zeros(tokens * k, dtype=acc).index_put_((assignment_of_row[valid],), dgate[valid])
    return dx, dw1, dw2, dweights.view(tokens, k)
