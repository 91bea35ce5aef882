"""Expert parallelism over ``torch.distributed``: experts sharded across ranks, tokens exchanged
with ``all_to_all_single``.

Rank ``r`` of a group of ``W`` ranks holds experts ``[r * E / W, (r + 1) * E / W)``. One step:

1. each rank groups its own tokens by expert (`permute`, capacity applied here, on the source
   rank, exactly as in the single-process layer); since each rank's experts are a contiguous
   block, the rows are then also grouped by destination rank;
2. the per-expert row counts are exchanged, then the rows (dispatch ``all_to_all``);
3. each rank runs its local experts on the rows it received (`moe_mlp` with unit gate weights);
4. the expert outputs go back to their source rank (combine ``all_to_all``), where `unpermute`
   applies the gate weights and sums the ``k`` choices of each token.

Backward runs the same exchanges in reverse (`_AllToAll`), so the result and every gradient
equal those of the single-process `moe_mlp` on each rank's tokens with the full weight set.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import FLOAT_DTYPES, check_tensor
from .experts import moe_mlp
from .ops import _check_expert_ids, _check_routing_args, permute, unpermute

__all__ = ["expert_parallel_mlp", "expert_shard"]


def _group_size_rank(fn: str, group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def expert_shard(num_experts: int, group=None) -> Tuple[int, int]:
    """``(first, count)``: the contiguous block of experts held by this rank of ``group``
    (``count = num_experts / world size``). Raises ValueError when the experts do not divide evenly."""
    fn = "expert_shard"
    world, rank = _group_size_rank(fn, group)
    if num_experts % world:
        raise ValueError(
            f"{fn}: num_experts must be divisible by the process group's world size {world} "
            f"(each rank holds an equal block of experts), got {num_experts}"
        )
    count = num_experts // world
    return rank * count, count


def _exchange(t: Tensor, send_splits: List[int], recv_splits: List[int], group) -> Tensor:
    """Rows ``t[sum(send_splits[:r]) : ...]`` go to rank r; rank r's rows for us arrive in block r."""
    out = t.new_empty((sum(recv_splits),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable `_exchange`: the gradient of a row goes back to the rank that sent it
    (the same exchange with send and receive splits swapped)."""

    @staticmethod
    def forward(ctx, t: Tensor, send_splits: List[int], recv_splits: List[int], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(t, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def expert_parallel_mlp(
    x: Tensor,
    w_gate_up_local: Tensor,
    w_down_local: Tensor,
    weights: Tensor,
    experts: Tensor,
    group=None,
    *,
    activation: str = "swiglu",
    capacity: Optional[int] = None,
) -> Tensor:
    """`moe_mlp` with the experts sharded across the ranks of ``group`` (collective: every rank
    must call it, also with zero tokens, and, when training, run the backward).

    Args:
        x: ``(T, d)`` this rank's tokens (T may differ between ranks, 0 included).
        w_gate_up_local: ``(E / W, h, d)`` this rank's block of experts (see `expert_shard`),
            ``h`` as in `moe_mlp`; dtype of ``x``.
        w_down_local: ``(E / W, d, ffn)``, dtype of ``x``.
        weights: ``(T, k)`` gate weights, applied on this rank at the combine.
        experts: ``(T, k)`` int32/int64 global expert ids in ``[0, E)``, ``E = W * (E / W)``.
        group: the process group (default: the world).
        activation, capacity: as in `moe_mlp`; the capacity limit applies per expert to this
            rank's tokens.

    Returns:
        ``(T, d)`` in ``x.dtype``, equal to ``moe_mlp`` on this rank's tokens with the full
        ``(E, ...)`` weights. Differentiable w.r.t. ``x``, the local weights (their gradient sums
        the contributions of every rank's tokens) and ``weights``; ``x`` must require grad on
        all ranks or on none.
    """
    fn = "expert_parallel_mlp"
    world, _ = _group_size_rank(fn, group)
    check_tensor(fn, "x", x, ndim=2, dims="(tokens, d)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "w_gate_up_local", w_gate_up_local, ndim=3, dims="(local experts, h, d)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "w_down_local", w_down_local, ndim=3, dims="(local experts, d, ffn)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "weights", weights, ndim=2, dims="(tokens, k)", dtypes=FLOAT_DTYPES)
    tokens, d = x.shape
    local = w_down_local.shape[0]
    if local < 1 or w_down_local.shape[1] != d or w_gate_up_local.shape[0] != local or w_gate_up_local.shape[2] != d:
        raise ValueError(
            f"{fn}: w_gate_up_local and w_down_local must have shapes (E_local, h, {d}) and (E_local, {d}, ffn) "
            f"with one E_local >= 1 (d of x is {d}), got {tuple(w_gate_up_local.shape)} and {tuple(w_down_local.shape)}"
        )
    num_experts = local * world
    _check_routing_args(fn, experts, num_experts, capacity, None)
    if experts.shape[0] != tokens or weights.shape != experts.shape:
        raise ValueError(
            f"{fn}: experts and weights must have shape ({tokens}, k) (one row per token of x), "
            f"got {tuple(experts.shape)} and {tuple(weights.shape)}"
        )
    _check_expert_ids(fn, experts, num_experts)

    x_sorted, routing = permute(x, experts, num_experts, capacity=capacity)
    # Rows are grouped by expert, hence by destination rank: rank r gets experts r*local .. (r+1)*local-1.
    send_counts = routing.counts.view(world, local)
    recv_counts = _exchange(send_counts, [1] * world, [1] * world, group)  # (source rank, local expert)
    send_splits = send_counts.sum(dim=1).tolist()
    recv_splits = recv_counts.sum(dim=1).tolist()
    used = sum(send_splits)

    received = _AllToAll.apply(x_sorted[:used], send_splits, recv_splits, group)
    local_ids = torch.arange(local, device=x.device).repeat(world).repeat_interleave(recv_counts.reshape(-1))
    unit = torch.ones((received.shape[0], 1), dtype=x.dtype, device=x.device)
    y_received = moe_mlp(received, w_gate_up_local, w_down_local, unit, local_ids[:, None], activation=activation)
    y_used = _AllToAll.apply(y_received, recv_splits, send_splits, group)

    y_sorted = torch.cat([y_used, y_used.new_zeros((x_sorted.shape[0] - used, d))])
    return unpermute(y_sorted, weights, routing)
