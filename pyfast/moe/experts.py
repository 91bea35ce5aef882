"""Expert compute ops: grouped GEMM over the expert-grouped layout and the fused sparse expert MLP.

Custom ops (all opaque to torch.compile, so per-expert row counts never reach Python in a graph):

- ``pyfast::moe_grouped_mm`` / ``pyfast::moe_grouped_mm_wgrad``: ``a[r] @ w[e].T`` on each expert's
  rows (or ``a[r] @ w[e]``, the input gradient) and the per-expert weight gradient.
- ``pyfast::moe_mlp`` / ``pyfast::moe_mlp_bwd``: the whole expert MLP from tokens to the weighted
  combine, ``(out, hidden)`` forward (``hidden``, the first GEMM's output, is saved for the
  backward) and ``(dx, dw_gate_up, dw_down, dweights)`` backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import register_op
from .._checks import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_tensor
from . import activations, reference
from .ops import _GPU_FLOATS, _check_expert_ids, _check_routing_args, _choose, _kernels, _route, _unit_last_stride
from .reference import compute_dtype
from .routing import Routing

register_op("moe.grouped_mm", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)
register_op("moe.moe_mlp", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)


# --------------------------------------------------------------------------------------------------
# grouped_mm
# --------------------------------------------------------------------------------------------------


def _grouped_mm_shape(a: Tensor, w: Tensor, trans_w: bool) -> Tuple[int, int]:
    return a.shape[0], w.shape[2] if trans_w else w.shape[1]


@torch.library.custom_op("pyfast::moe_grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool, backend: str) -> Tensor:
    return _kernels(backend).grouped_mm(a, w, counts, offsets, trans_w)


@_grouped_mm_op.register_fake
def _(a, w, counts, offsets, trans_w, backend):
    return a.new_empty(_grouped_mm_shape(a, w, trans_w))


@torch.library.custom_op("pyfast::moe_grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(grad: Tensor, a: Tensor, counts: Tensor, offsets: Tensor, trans_w: bool, backend: str) -> Tensor:
    return _kernels(backend).grouped_mm_wgrad(grad, a, counts, offsets, counts.shape[0], trans_w)


@_grouped_mm_wgrad_op.register_fake
def _(grad, a, counts, offsets, trans_w, backend):
    inner = (a.shape[1], grad.shape[1]) if trans_w else (grad.shape[1], a.shape[1])
    return a.new_empty((counts.shape[0],) + inner)


def _grouped_mm_setup(ctx, inputs, output):
    a, w, counts, offsets, trans_w, backend = inputs
    ctx.save_for_backward(a, w, counts, offsets)
    ctx.trans_w, ctx.backend = trans_w, backend


def _grouped_mm_backward(ctx, grad):
    a, w, counts, offsets = ctx.saved_tensors
    grad = _unit_last_stride(grad)
    grad_a = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_mm_op(grad, w, counts, offsets, not ctx.trans_w, ctx.backend)
    if ctx.needs_input_grad[1]:
        grad_w = _grouped_mm_wgrad_op(grad, a, counts, offsets, ctx.trans_w, ctx.backend)
    return grad_a, grad_w, None, None, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _check_routing(fn: str, routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"{fn}: routing must be the Routing returned by permute/route, got {type(routing).__name__}")


def _check_same_dtype(fn: str, **tensors: Tensor) -> None:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} is {t.dtype}" for name, t in tensors.items())
        raise TypeError(f"{fn}: {', '.join(tensors)} must have one dtype, got {listing}")


def grouped_mm(x_sorted: Tensor, w: Tensor, routing: Routing) -> Tensor:
    """Per-expert GEMMs over the expert-grouped rows.

    Args:
        x_sorted: ``(R, k)`` float32/float16/bfloat16/float64 rows grouped by expert (`permute`).
        w: ``(E, n, k)`` expert weights in the ``nn.Linear`` layout (out features, in features),
            same dtype as ``x_sorted``.
        routing: the `Routing` of the layout; expert e owns rows ``offsets[e] : offsets[e] + counts[e]``.

    Returns:
        ``(R, n)`` in ``x_sorted.dtype``: ``x_sorted[r] @ w[e].T`` on expert e's rows, zeros on
        padding and unused rows; accumulated in float32 (float64 for float64). Differentiable
        w.r.t. ``x_sorted`` and ``w``; any row counts, empty experts included.
    """
    fn = "grouped_mm"
    _check_routing(fn, routing)
    check_tensor(fn, "x_sorted", x_sorted, ndim=2, dims="(rows, k)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "w", w, ndim=3, dims="(experts, n, k)", dtypes=FLOAT_DTYPES)
    rows = routing.assignment_of_row.shape[0]
    if x_sorted.shape[0] != rows:
        raise ValueError(f"{fn}: x_sorted must have routing's {rows} rows, got {x_sorted.shape[0]}")
    if w.shape[0] != routing.num_experts or w.shape[2] != x_sorted.shape[1]:
        raise ValueError(
            f"{fn}: w must have shape ({routing.num_experts}, n, {x_sorted.shape[1]}) (experts, n, k), "
            f"got {tuple(w.shape)}"
        )
    _check_same_dtype(fn, x_sorted=x_sorted, w=w)
    check_same_device(fn, x_sorted=x_sorted, w=w, routing=routing.offsets)
    backend = _choose("moe.grouped_mm", x_sorted, routing.num_experts, 1)
    if backend == "reference":
        return reference.grouped_mm(x_sorted, w, routing)
    return _grouped_mm_op(
        _unit_last_stride(x_sorted), w.contiguous(), routing.counts, routing.offsets, False, backend
    )


# --------------------------------------------------------------------------------------------------
# moe_mlp
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::moe_mlp", mutates_args=())
def _moe_mlp_op(
    x: Tensor, w1: Tensor, w2: Tensor, weights: Tensor, row_of_assignment: Tensor, assignment_of_row: Tensor,
    counts: Tensor, offsets: Tensor, activation: str, backend: str,
) -> Tuple[Tensor, Tensor]:
    return _kernels(backend).moe_mlp_fwd(
        x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets, activation
    )


@_moe_mlp_op.register_fake
def _(x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets, activation, backend):
    return torch.empty_like(x), x.new_empty((assignment_of_row.shape[0], w1.shape[1]))


@torch.library.custom_op("pyfast::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(
    grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, weights: Tensor, hidden: Tensor,
    row_of_assignment: Tensor, assignment_of_row: Tensor, counts: Tensor, offsets: Tensor, activation: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels(backend).moe_mlp_bwd(
        grad_out, x, w1, w2, weights, hidden, row_of_assignment, assignment_of_row, counts, offsets, activation
    )


@_moe_mlp_bwd_op.register_fake
def _(grad_out, x, w1, w2, weights, hidden, row_of_assignment, assignment_of_row, counts, offsets, activation, backend):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(weights)


def _moe_mlp_setup(ctx, inputs, output):
    x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets, activation, backend = inputs
    ctx.save_for_backward(x, w1, w2, weights, output[1], row_of_assignment, assignment_of_row, counts, offsets)
    ctx.activation, ctx.backend = activation, backend
    ctx.mark_non_differentiable(output[1])


def _moe_mlp_backward(ctx, grad_out, _grad_hidden):
    x, w1, w2, weights, hidden, row_of_assignment, assignment_of_row, counts, offsets = ctx.saved_tensors
    dx, dw1, dw2, dweights = _moe_mlp_bwd_op(
        _unit_last_stride(grad_out), x, w1, w2, weights, hidden, row_of_assignment, assignment_of_row,
        counts, offsets, ctx.activation, ctx.backend,
    )
    return dx, dw1, dw2, dweights, None, None, None, None, None, None


_moe_mlp_op.register_autograd(_moe_mlp_backward, setup_context=_moe_mlp_setup)


def moe_mlp(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    weights: Tensor,
    experts: Tensor,
    *,
    activation: str = "swiglu",
    capacity: Optional[int] = None,
) -> Tensor:
    """The sparse expert MLP from tokens to the gate-weighted combine, in one op.

    ``out[t] = sum_j weights[t, j] * w_down[e] @ act(w_gate_up[e] @ x[t])``, ``e = experts[t, j]``.

    Args:
        x: ``(T, d)`` float32/float16/bfloat16/float64 tokens.
        w_gate_up: ``(E, h, d)``, ``h = 2 * ffn`` for gated activations (gate rows, then up rows,
            as Mixtral's ``w1`` and ``w3`` stacked), ``h = ffn`` otherwise; dtype of ``x``.
        w_down: ``(E, d, ffn)``, dtype of ``x``.
        weights: ``(T, k)`` gate weights (any float dtype; used in the compute dtype).
        experts: ``(T, k)`` int32/int64 expert ids (e.g. from `topk_gating`).
        activation: one of ``"swiglu"``, ``"geglu"``, ``"silu"``, ``"gelu"``, ``"relu"``.
        capacity: keep at most this many assignments per expert (as in `route`); dropped
            assignments contribute zero.

    Returns:
        ``(T, d)`` in ``x.dtype``, accumulated in float32 (float64 for float64). Differentiable
        w.r.t. ``x``, ``w_gate_up``, ``w_down`` and ``weights``.
    """
    fn = "moe_mlp"
    check_tensor(fn, "x", x, ndim=2, dims="(tokens, d)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "w_gate_up", w_gate_up, ndim=3, dims="(experts, h, d)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "w_down", w_down, ndim=3, dims="(experts, d, ffn)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "weights", weights, ndim=2, dims="(tokens, k)", dtypes=FLOAT_DTYPES)
    check_choice(fn, "activation", activation, activations.ACTIVATIONS)
    tokens, d = x.shape
    num_experts, ffn = w_down.shape[0], w_down.shape[2]
    check_int(fn, "num_experts", num_experts, low=1, what="w_down.shape[0]")
    if w_down.shape[1] != d:
        raise ValueError(f"{fn}: w_down must have shape (experts, {d}, ffn) (d of x is {d}), got {tuple(w_down.shape)}")
    width = activations.hidden_width(activation, ffn)
    if tuple(w_gate_up.shape) != (num_experts, width, d):
        raise ValueError(
            f"{fn}: w_gate_up must have shape ({num_experts}, {width}, {d}) (experts, "
            f"{'2 * ffn' if activations.is_gated(activation) else 'ffn'} for {activation!r}, d), got {tuple(w_gate_up.shape)}"
        )
    _check_same_dtype(fn, x=x, w_gate_up=w_gate_up, w_down=w_down)
    _check_routing_args(fn, experts, num_experts, capacity, None)
    if experts.shape[0] != tokens or weights.shape != experts.shape:
        raise ValueError(
            f"{fn}: experts and weights must have shape ({tokens}, k) (one row per token of x), "
            f"got {tuple(experts.shape)} and {tuple(weights.shape)}"
        )
    check_same_device(fn, x=x, w_gate_up=w_gate_up, w_down=w_down, weights=weights, experts=experts)
    _check_expert_ids(fn, experts, num_experts)
    backend = _choose("moe.moe_mlp", x, num_experts, experts.shape[1])
    if backend == "reference":
        return reference.moe_mlp(x, w_gate_up, w_down, weights, experts, activation=activation, capacity=capacity)
    routing = _route(experts, num_experts, capacity, None)
    out, _ = _moe_mlp_op(
        _unit_last_stride(x), w_gate_up.contiguous(), w_down.contiguous(),
        weights.to(compute_dtype(x.dtype)).contiguous(), routing.row_of_assignment, routing.assignment_of_row,
        routing.counts, routing.offsets, activation, backend,
    )
    return out
