"""MoE routing ops: validation, `torch.library` custom ops, autograd, backend dispatch.

Each public function validates its arguments, asks `backend_for` which implementation runs, and
either calls `reference.py` (plain torch, autograd by torch) or a ``pyfast::moe_*`` custom op whose
implementation runs the chosen kernel backend (`_cpu.py` over ``pyfast._C``, the Triton launchers
in ``pyfast.triton_kernels.moe``, or ``pyfast._cuda``). Backward passes are custom ops too, so
``torch.compile`` traces forward and backward without graph breaks.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._backend import backend_for, register_op
from .._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_same_device,
    check_tensor,
    value_checks_enabled,
)
from . import reference
from .reference import compute_dtype
from .routing import Routing, num_rows

MAX_EXPERTS = 512
MAX_K = 16
INDEX_DTYPES = (torch.int32, torch.int64)
_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

register_op("moe.topk_gating", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)
register_op("moe.route", cpu=INDEX_DTYPES, triton=INDEX_DTYPES, cuda=INDEX_DTYPES)
register_op("moe.permute", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)
register_op("moe.unpermute", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)
# On the CPU torch's AVX-vectorized softmax beat a fused C++ loss kernel: the reference runs there.
register_op("moe.load_balancing_loss", triton=_GPU_FLOATS)
register_op("moe.router_z_loss", cpu=FLOAT_DTYPES, triton=_GPU_FLOATS)

_KERNEL_MODULES = {"cpu": "pyfast.moe._cpu", "triton": "pyfast.triton_kernels.moe", "cuda": "pyfast.moe._cuda"}


def _kernels(backend: str):
    """The module implementing the kernel contract for ``backend`` (imported on first use)."""
    return importlib.import_module(_KERNEL_MODULES[backend])


def _choose(op: str, tensor: Tensor, num_experts: int, k: int) -> str:
    """Backend for this call; shapes beyond the kernels' limits go to the reference."""
    if num_experts > MAX_EXPERTS or k > MAX_K:
        return "reference"
    return backend_for(op, tensor).backend


def _unit_last_stride(t: Tensor) -> Tensor:
    """Kernels take any row stride but need unit stride along the last axis."""
    return t if t.dim() < 2 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _eager_value_checks() -> bool:
    """Value checks in Python run eagerly only (under torch.compile they would break the graph)."""
    return value_checks_enabled() and not torch.compiler.is_compiling()


def _check_finite_rows(fn: str, name: str, t: Tensor) -> None:
    """Reference path: reject non-finite rows (kernels count them in their own pass)."""
    if _eager_value_checks():
        bad = int((~torch.isfinite(t)).any(dim=-1).sum()) if t.numel() else 0
        if bad:
            raise ValueError(f"{fn}: {name} has {bad} row(s) with non-finite values (NaN or Inf)")


def _check_expert_ids(fn: str, experts: Tensor, num_experts: int) -> None:
    if _eager_value_checks() and experts.numel():
        low, high = experts.aminmax()  # one pass; the count below only on failure
        if low < 0 or high >= num_experts:
            bad = int(((experts < 0) | (experts >= num_experts)).sum())
            raise ValueError(f"{fn}: experts must hold ids in [0, {num_experts}), got {bad} out of range")


# --------------------------------------------------------------------------------------------------
# topk_gating
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::moe_topk_gating", mutates_args=())
def _topk_gating_op(
    logits: Tensor, k: int, softmax: bool, temperature: Tensor, renormalize: bool, bias: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    weights, experts, bad = _kernels(backend).topk_gating_fwd(
        logits, k, softmax, temperature, renormalize, bias, value_checks_enabled()
    )
    if bad:
        raise ValueError(f"topk_gating: logits has {bad} row(s) with non-finite values (NaN or Inf)")
    return weights, experts


@_topk_gating_op.register_fake
def _(logits, k, softmax, temperature, renormalize, bias, backend):
    shape = (logits.shape[0], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("pyfast::moe_topk_gating_bwd", mutates_args=())
def _topk_gating_bwd_op(
    grad_weights: Tensor, logits: Tensor, experts: Tensor, softmax: bool, temperature: Tensor, renormalize: bool, backend: str
) -> Tensor:
    return _kernels(backend).topk_gating_bwd(grad_weights, logits, experts, softmax, temperature, renormalize)


@_topk_gating_bwd_op.register_fake
def _(grad_weights, logits, experts, softmax, temperature, renormalize, backend):
    return torch.empty_like(logits)


def _topk_gating_setup(ctx, inputs, output):
    logits, _, softmax, temperature, renormalize, _, backend = inputs
    ctx.save_for_backward(logits, temperature, output[1])
    ctx.softmax, ctx.renormalize, ctx.backend = softmax, renormalize, backend


def _topk_gating_backward(ctx, grad_weights, _grad_experts):
    logits, temperature, experts = ctx.saved_tensors
    grad_logits = _topk_gating_bwd_op(
        _unit_last_stride(grad_weights), logits, experts, ctx.softmax, temperature, ctx.renormalize, ctx.backend
    )
    grad_temperature = None
    if ctx.needs_input_grad[3]:
        # z = logits / T  =>  dL/dT = -sum(dL/dz * z) / T = -sum(dL/dlogits * logits) / T
        acc = temperature.dtype
        grad_temperature = -(grad_logits.to(acc) * logits.to(acc)).sum() / temperature
    return grad_logits, None, None, grad_temperature, None, None, None


_topk_gating_op.register_autograd(_topk_gating_backward, setup_context=_topk_gating_setup)


def topk_gating(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    temperature: Union[float, Tensor] = 1.0,
    renormalize: bool = True,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused router scores + top-k + renormalization.

    Args:
        logits: ``(T, E)`` float32/float16/bfloat16/float64 router logits.
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` or ``"sigmoid"`` of ``logits / temperature``.
        temperature: positive float, or a one-element tensor that may require grad (learnable
            temperature; dense-to-sparse gating anneals it).
        renormalize: divide the k weights by their sum.
        bias: optional ``(E,)`` routing-only bias added to the scores for selection but not to the
            weights (aux-loss-free load balancing).

    Returns:
        ``weights (T, k)`` in ``logits.dtype`` and ``experts (T, k) int32``, in descending score
        order, ties to the lowest expert index. Differentiable w.r.t. ``logits`` and ``temperature``.
    """
    fn = "topk_gating"
    check_tensor(fn, "logits", logits, ndim=2, dims="(tokens, experts)", dtypes=FLOAT_DTYPES)
    tokens, num_experts = logits.shape
    check_int(fn, "k", k, low=1, high=num_experts, what=f"logits has {num_experts} experts")
    check_choice(fn, "score", score, ("softmax", "sigmoid"))
    acc = compute_dtype(logits.dtype)
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError(
                f"{fn}: temperature must be a float or a one-element floating tensor, "
                f"got shape {tuple(temperature.shape)} dtype {temperature.dtype}"
            )
        check_same_device(fn, logits=logits, temperature=temperature)
        temperature_t = temperature.reshape(()).to(acc)
        if _eager_value_checks() and not bool(temperature_t > 0):
            raise ValueError(f"{fn}: temperature must be > 0, got {float(temperature_t)}")
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not temperature > 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
        temperature_t = torch.full((), float(temperature), dtype=acc, device=logits.device)
    else:
        raise TypeError(f"{fn}: temperature must be a float or a tensor, got {type(temperature).__name__}")
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=1, dims="(experts,)", dtypes=FLOAT_DTYPES)
        if bias.shape[0] != num_experts:
            raise ValueError(f"{fn}: bias must have shape ({num_experts},), got {tuple(bias.shape)}")
        check_same_device(fn, logits=logits, bias=bias)

    backend = _choose("moe.topk_gating", logits, num_experts, k)
    if backend == "reference":
        _check_finite_rows(fn, "logits", logits)
        return reference.topk_gating(
            logits, k, score=score, temperature=temperature_t, renormalize=renormalize, bias=bias
        )
    bias_t = None if bias is None else bias.detach().to(acc).contiguous()
    return _topk_gating_op(_unit_last_stride(logits), k, score == "softmax", temperature_t, renormalize, bias_t, backend)


# --------------------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::moe_route", mutates_args=())
def _route_op(
    experts: Tensor, num_experts: int, capacity: int, align: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens, k = experts.shape
    rows = num_rows(tokens, k, num_experts, capacity or None, align or None)
    counts, offsets, row_of_assignment, assignment_of_row, bad = _kernels(backend).route(
        experts, num_experts, capacity, align, rows, value_checks_enabled()
    )
    if bad:
        raise ValueError(f"route: experts must hold ids in [0, {num_experts}), got {bad} out of range")
    return counts, offsets, row_of_assignment, assignment_of_row


@_route_op.register_fake
def _(experts, num_experts, capacity, align, backend):
    tokens, k = experts.shape
    rows = num_rows(tokens, k, num_experts, capacity or None, align or None)
    new = lambda *shape: experts.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(tokens, k), new(rows)


def _check_routing_args(fn: str, experts: Tensor, num_experts: int, capacity, align) -> None:
    check_tensor(fn, "experts", experts, ndim=2, dims="(tokens, k)", dtypes=INDEX_DTYPES)
    check_int(fn, "num_experts", num_experts, low=1)
    check_int(fn, "k", experts.shape[1], low=1, high=num_experts, what=f"at most num_experts={num_experts} choices per token")
    if capacity is not None:
        check_int(fn, "capacity", capacity, low=1, what="rows kept per expert")
    if align is not None:
        check_int(fn, "align", align, low=1, what="segment start alignment in rows")


def route(experts: Tensor, num_experts: int, *, capacity: Optional[int] = None, align: Optional[int] = None) -> Routing:
    """Group the ``(T, k)`` expert choices by expert; see `Routing` for the layout.

    Args:
        experts: ``(T, k)`` int32/int64 expert ids in ``[0, num_experts)``, distinct per row.
        num_experts: E.
        capacity: keep at most this many assignments per expert (slot-then-token priority);
            dropped assignments get row -1 (`Routing.dropped`). None keeps all.
        align: start every expert's segment at a multiple of ``align`` rows (block GEMMs).
    """
    _check_routing_args("route", experts, num_experts, capacity, align)
    return _route(experts, num_experts, capacity, align)


def _route(experts: Tensor, num_experts: int, capacity: Optional[int], align: Optional[int]) -> Routing:
    backend = _choose("moe.route", experts, num_experts, experts.shape[1])
    if backend == "reference":
        _check_expert_ids("route", experts, num_experts)
        return reference.route(experts, num_experts, capacity=capacity, align=align)
    ids = experts.to(torch.int32).contiguous()
    return Routing(*_route_op(ids, num_experts, capacity or 0, align or 0, backend))


# --------------------------------------------------------------------------------------------------
# permute / unpermute: two row-movement kernels that are each other's backward
#   gather:  out[r] = scale[a(r)] * x[a(r) // k]          (permute; grad of unpermute w.r.t. y)
#   combine: out[t] = sum_j w[t, j] * y[row(t, j)]        (unpermute; grad of permute w.r.t. x)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::moe_gather_rows", mutates_args=())
def _gather_rows_op(
    x: Tensor, assignment_of_row: Tensor, row_of_assignment: Tensor, scale: Optional[Tensor], backend: str
) -> Tensor:
    return _kernels(backend).gather_rows(x, assignment_of_row, row_of_assignment.shape[1], scale)


@_gather_rows_op.register_fake
def _(x, assignment_of_row, row_of_assignment, scale, backend):
    return x.new_empty((assignment_of_row.shape[0], x.shape[1]))


@torch.library.custom_op("pyfast::moe_combine_rows", mutates_args=())
def _combine_rows_op(
    y: Tensor, row_of_assignment: Tensor, assignment_of_row: Tensor, weights: Optional[Tensor], backend: str
) -> Tensor:
    return _kernels(backend).combine_rows(y, row_of_assignment, weights)


@_combine_rows_op.register_fake
def _(y, row_of_assignment, assignment_of_row, weights, backend):
    return y.new_empty((row_of_assignment.shape[0], y.shape[1]))


@torch.library.custom_op("pyfast::moe_combine_weights_grad", mutates_args=())
def _combine_weights_grad_op(grad_out: Tensor, y: Tensor, row_of_assignment: Tensor, backend: str) -> Tensor:
    return _kernels(backend).combine_weights_grad(grad_out, y, row_of_assignment)


@_combine_weights_grad_op.register_fake
def _(grad_out, y, row_of_assignment, backend):
    return grad_out.new_empty(row_of_assignment.shape, dtype=compute_dtype(y.dtype))


def _save_rows(ctx, inputs, output):
    data, index_a, index_b, coefficients, backend = inputs
    ctx.save_for_backward(data, index_a, index_b, coefficients)
    ctx.backend = backend


def _gather_rows_backward(ctx, grad):
    x, assignment_of_row, row_of_assignment, scale = ctx.saved_tensors
    grad = _unit_last_stride(grad)
    grad_x = _combine_rows_op(grad, row_of_assignment, assignment_of_row, scale, ctx.backend)
    grad_scale = None
    if ctx.needs_input_grad[3]:
        grad_scale = _combine_weights_grad_op(x, grad, row_of_assignment, ctx.backend).reshape(-1)
    return grad_x, None, None, grad_scale, None


def _combine_rows_backward(ctx, grad):
    y, row_of_assignment, assignment_of_row, weights = ctx.saved_tensors
    grad = _unit_last_stride(grad)
    scale = None if weights is None else weights.reshape(-1)
    grad_y = _gather_rows_op(grad, assignment_of_row, row_of_assignment, scale, ctx.backend)
    grad_weights = None
    if ctx.needs_input_grad[3]:
        grad_weights = _combine_weights_grad_op(grad, y, row_of_assignment, ctx.backend)
    return grad_y, None, None, grad_weights, None


_gather_rows_op.register_autograd(_gather_rows_backward, setup_context=_save_rows)
_combine_rows_op.register_autograd(_combine_rows_backward, setup_context=_save_rows)


def permute(
    x: Tensor, experts: Tensor, num_experts: int, *, capacity: Optional[int] = None, align: Optional[int] = None
) -> Tuple[Tensor, Routing]:
    """Group tokens by expert.

    Args:
        x: ``(T, d)`` float32/float16/bfloat16/float64 tokens.
        experts: ``(T, k)`` int32/int64 expert ids (e.g. from `topk_gating`).
        num_experts, capacity, align: as in `route`.

    Returns:
        ``x_sorted (R, d)`` in ``x.dtype`` (R = `routing.num_rows`, padding rows zero) and the
        `Routing`. Differentiable w.r.t. ``x``.
    """
    fn = "permute"
    check_tensor(fn, "x", x, ndim=2, dims="(tokens, d)", dtypes=FLOAT_DTYPES)
    _check_routing_args(fn, experts, num_experts, capacity, align)
    if experts.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: experts must have one row per token of x ({x.shape[0]}), got {experts.shape[0]}")
    check_same_device(fn, x=x, experts=experts)
    routing = _route(experts, num_experts, capacity, align)
    backend = _choose("moe.permute", x, num_experts, experts.shape[1])
    if backend == "reference":
        return reference.gather_rows(x, routing), routing
    x_sorted = _gather_rows_op(
        _unit_last_stride(x), routing.assignment_of_row, routing.row_of_assignment, None, backend
    )
    return x_sorted, routing


def unpermute(y_sorted: Tensor, weights: Tensor, routing: Routing) -> Tensor:
    """Weighted combine of expert outputs back to token order.

    Args:
        y_sorted: ``(R, d)`` expert outputs in the grouped layout of ``routing``.
        weights: ``(T, k)`` gate weights (e.g. from `topk_gating`).
        routing: the `Routing` that produced the layout.

    Returns:
        ``(T, d)`` in ``y_sorted.dtype``: ``sum_j weights[t, j] * y_sorted[row(t, j)]``, computed in
        float32 (float64 for float64); dropped assignments contribute zero. Differentiable w.r.t.
        ``y_sorted`` and ``weights``.
    """
    fn = "unpermute"
    if not isinstance(routing, Routing):
        raise TypeError(f"{fn}: routing must be the Routing returned by permute/route, got {type(routing).__name__}")
    check_tensor(fn, "y_sorted", y_sorted, ndim=2, dims="(rows, d)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "weights", weights, ndim=2, dims="(tokens, k)", dtypes=FLOAT_DTYPES)
    rows = routing.assignment_of_row.shape[0]
    if y_sorted.shape[0] != rows:
        raise ValueError(f"{fn}: y_sorted must have routing's {rows} rows, got {y_sorted.shape[0]}")
    if weights.shape != routing.row_of_assignment.shape:
        raise ValueError(
            f"{fn}: weights must have shape {tuple(routing.row_of_assignment.shape)} (tokens, k), "
            f"got {tuple(weights.shape)}"
        )
    check_same_device(fn, y_sorted=y_sorted, weights=weights, routing=routing.row_of_assignment)
    backend = _choose("moe.unpermute", y_sorted, routing.num_experts, routing.top_k)
    if backend == "reference":
        return reference.unpermute(y_sorted, weights, routing)
    w = weights.to(compute_dtype(y_sorted.dtype)).contiguous()
    return _combine_rows_op(
        _unit_last_stride(y_sorted), routing.row_of_assignment, routing.assignment_of_row, w, backend
    )


# --------------------------------------------------------------------------------------------------
# aux losses
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::moe_load_balancing_loss", mutates_args=())
def _load_balancing_loss_op(router: Tensor, experts: Tensor, from_logits: bool, backend: str) -> Tensor:
    return _kernels(backend).load_balancing_loss_fwd(router, experts, from_logits)


@_load_balancing_loss_op.register_fake
def _(router, experts, from_logits, backend):
    return router.new_empty((), dtype=compute_dtype(router.dtype))


@torch.library.custom_op("pyfast::moe_load_balancing_loss_bwd", mutates_args=())
def _load_balancing_loss_bwd_op(grad: Tensor, router: Tensor, experts: Tensor, from_logits: bool, backend: str) -> Tensor:
    return _kernels(backend).load_balancing_loss_bwd(grad, router, experts, from_logits)


@_load_balancing_loss_bwd_op.register_fake
def _(grad, router, experts, from_logits, backend):
    return torch.empty_like(router)


def _load_balancing_setup(ctx, inputs, output):
    router, experts, from_logits, backend = inputs
    ctx.save_for_backward(router, experts)
    ctx.from_logits, ctx.backend = from_logits, backend


def _load_balancing_backward(ctx, grad):
    router, experts = ctx.saved_tensors
    return _load_balancing_loss_bwd_op(grad, router, experts, ctx.from_logits, ctx.backend), None, None, None


_load_balancing_loss_op.register_autograd(_load_balancing_backward, setup_context=_load_balancing_setup)


def load_balancing_loss(router: Tensor, experts: Tensor, *, input: str = "logits") -> Tensor:
    """Switch / GShard load-balancing loss ``E * sum_e f_e * P_e`` (1 under uniform routing).

    Args:
        router: ``(T, E)`` router logits (``input="logits"``) or probabilities (``input="probs"``).
        experts: ``(T, k)`` chosen expert ids; ``f_e`` is the fraction of assignments to e.
        input: how to read ``router``.

    Returns:
        0-d tensor in float32 (float64 for float64 input); differentiable w.r.t. ``router``.
    """
    fn = "load_balancing_loss"
    check_tensor(fn, "router", router, ndim=2, dims="(tokens, experts)", dtypes=FLOAT_DTYPES)
    check_choice(fn, "input", input, ("logits", "probs"))
    tokens, num_experts = router.shape
    _check_routing_args(fn, experts, num_experts, None, None)
    if experts.shape[0] != tokens:
        raise ValueError(f"{fn}: experts must have one row per token of router ({tokens}), got {experts.shape[0]}")
    check_same_device(fn, router=router, experts=experts)
    _check_expert_ids(fn, experts, num_experts)
    backend = _choose("moe.load_balancing_loss", router, num_experts, experts.shape[1])
    if backend == "reference":
        return reference.load_balancing_loss(router, experts, input=input)
    ids = experts.to(torch.int32).contiguous()
    return _load_balancing_loss_op(_unit_last_stride(router), ids, input == "logits", backend)


@torch.library.custom_op("pyfast::moe_router_z_loss", mutates_args=())
def _router_z_loss_op(logits: Tensor, backend: str) -> Tensor:
    return _kernels(backend).router_z_loss_fwd(logits)


@_router_z_loss_op.register_fake
def _(logits, backend):
    return logits.new_empty((), dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("pyfast::moe_router_z_loss_bwd", mutates_args=())
def _router_z_loss_bwd_op(grad: Tensor, logits: Tensor, backend: str) -> Tensor:
    return _kernels(backend).router_z_loss_bwd(grad, logits)


@_router_z_loss_bwd_op.register_fake
def _(grad, logits, backend):
    return torch.empty_like(logits)


def _router_z_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.backend = inputs[1]


def _router_z_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _router_z_loss_bwd_op(grad, logits, ctx.backend), None


_router_z_loss_op.register_autograd(_router_z_backward, setup_context=_router_z_setup)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``.

    Args:
        logits: ``(T, E)`` router logits.

    Returns:
        0-d tensor in float32 (float64 for float64 input); differentiable w.r.t. ``logits``.
    """
    fn = "router_z_loss"
    check_tensor(fn, "logits", logits, ndim=2, dims="(tokens, experts)", dtypes=FLOAT_DTYPES)
    backend = _choose("moe.router_z_loss", logits, logits.shape[1], 1)
    if backend == "reference":
        return reference.router_z_loss(logits)
    return _router_z_loss_op(_unit_last_stride(logits), backend)
