"""``nn.Module`` layers built on the pyfast.moe ops."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from . import activations
from .experts import moe_mlp
from .ops import load_balancing_loss, router_z_loss, topk_gating
from .parallel import expert_parallel_mlp, expert_shard
from .routing import expert_capacity

__all__ = ["MoEAuxLosses", "PyramidMoE", "SparseMoE", "temperature_schedule"]

ROUTERS = ("softmax", "sigmoid_bias")


class MoEAuxLosses(NamedTuple):
    """Auxiliary losses of one MoE layer (unweighted; add ``w * loss`` to the training loss).

    load_balancing: Switch / GShard ``E * sum_e f_e P_e`` (1 under uniform routing).
    router_z: ST-MoE ``mean_t logsumexp(logits_t)^2``.
    """

    load_balancing: Tensor
    router_z: Tensor


class SparseMoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer: router, top-k gating, experts, combine.

    ``y = sum_j g_j(x) * expert_{e_j}(x) + shared(x)``, each expert an MLP
    ``w_down[e] @ act(w_gate_up[e] @ x)`` run by `pyfast.moe.moe_mlp`.

    Args:
        d_model: features of x.
        d_ff: hidden units of each expert.
        num_experts: E.
        k: experts per token.
        router: ``"softmax"`` (top-k of a softmax with ``temperature``, weights renormalized over the
            k choices) or ``"sigmoid_bias"`` (sigmoid scores with a routing-only bias, DeepSeek-V3's
            aux-loss-free balancing: call `update_routing_bias` after each optimizer step).
        activation: expert activation (see `pyfast.moe.activations`); ``"swiglu"`` by default.
        capacity_factor: drop assignments beyond ``ceil(T / E * capacity_factor * k)`` per expert
            (slot-then-token priority); None keeps every assignment (dropless).
        num_shared_experts: always-on experts (DeepSeekMoE), one dense MLP of width
            ``num_shared_experts * d_ff`` added to the output.
        residual: DeepSpeed-MoE's Residual-MoE: a dense MLP of width ``d_ff`` beside the experts,
            mixed per token as ``c_0 * moe(x) + c_1 * mlp(x)``, ``c = softmax(Linear(d_model, 2)(x))``
            (usually with ``k=1``: the expert acts as a correction of the dense MLP).
        temperature: softmax temperature of the router (a float; may be changed between steps,
            e.g. annealed from dense to sparse gating with `temperature_schedule`).
        bias_update_rate: step of the routing-bias update of ``"sigmoid_bias"``.
        process_group: expert parallelism (`pyfast.moe.parallel`): a ``torch.distributed`` process
            group (e.g. ``torch.distributed.group.WORLD``) of W ranks; this rank then holds only its
            block of ``num_experts / W`` experts (from ``expert_start``) in ``w_gate_up`` /
            ``w_down`` and exchanges tokens with the other ranks, which must run the layer in the
            same step. The router, shared and residual MLPs stay replicated. None: all experts local.

    Shapes: ``forward(x (..., d_model)) -> (y (..., d_model), MoEAuxLosses)``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int,
        *,
        router: str = "softmax",
        activation: str = "swiglu",
        capacity_factor: Optional[float] = None,
        num_shared_experts: int = 0,
        residual: bool = False,
        temperature: float = 1.0,
        bias_update_rate: float = 1e-3,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fn = "SparseMoE"
        check_int(fn, "d_model", d_model, low=1)
        check_int(fn, "d_ff", d_ff, low=1)
        check_int(fn, "num_experts", num_experts, low=1)
        check_int(fn, "k", k, low=1, high=num_experts, what=f"at most num_experts={num_experts}")
        check_int(fn, "num_shared_experts", num_shared_experts, low=0)
        check_choice(fn, "router", router, ROUTERS)
        check_choice(fn, "activation", activation, activations.ACTIVATIONS)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"{fn}: capacity_factor must be > 0 or None, got {capacity_factor}")
        if not temperature > 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.router, self.activation = router, activation
        self.capacity_factor, self.temperature, self.bias_update_rate = capacity_factor, temperature, bias_update_rate
        self.gate = nn.Linear(d_model, num_experts, bias=False, **factory)
        self.process_group = process_group
        self.expert_start, local = 0, num_experts
        if process_group is not None:
            self.expert_start, local = expert_shard(num_experts, process_group)
        width = activations.hidden_width(activation, d_ff)
        self.w_gate_up = nn.Parameter(torch.empty(local, width, d_model, **factory))
        self.w_down = nn.Parameter(torch.empty(local, d_model, d_ff, **factory))
        self.shared = None
        if num_shared_experts:
            self.shared = _DenseMLP(d_model, num_shared_experts * d_ff, activation, **factory)
        self.residual_mlp = self.coefficient = None
        if residual:
            self.residual_mlp = _DenseMLP(d_model, d_ff, activation, **factory)
            self.coefficient = nn.Linear(d_model, 2, **factory)
        self.register_buffer("routing_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(self.d_ff))
        self.gate.reset_parameters()

    def forward(self, x: Tensor):
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SparseMoE: x must have d_model={self.d_model} features in its last axis, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        logits = self.gate(flat)
        sigmoid = self.router == "sigmoid_bias"
        weights, experts = topk_gating(
            logits,
            self.k,
            score="sigmoid" if sigmoid else "softmax",
            temperature=self.temperature,
            bias=self.routing_bias if sigmoid else None,
        )
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(flat.shape[0], self.num_experts, self.k, self.capacity_factor)
        if self.process_group is None:
            out = moe_mlp(flat, self.w_gate_up, self.w_down, weights, experts, activation=self.activation, capacity=capacity)
        else:
            out = expert_parallel_mlp(
                flat, self.w_gate_up, self.w_down, weights, experts, self.process_group,
                activation=self.activation, capacity=capacity,
            )
        if self.residual_mlp is not None:
            c = torch.softmax(self.coefficient(flat), dim=-1)
            out = out * c[:, :1] + self.residual_mlp(flat) * c[:, 1:]
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training and sigmoid:
            with torch.no_grad():
                self.expert_load.index_add_(0, experts.reshape(-1).long(), self.expert_load.new_ones(experts.numel()))
        aux = MoEAuxLosses(load_balancing_loss(logits, experts), router_z_loss(logits))
        return out.reshape(x.shape), aux

    @torch.no_grad()
    def update_routing_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the routing bias of under-loaded experts
        and lower it for over-loaded ones by ``bias_update_rate``, from the assignments counted
        since the last update; then reset the counts."""
        if self.router != "sigmoid_bias":
            raise RuntimeError("SparseMoE.update_routing_bias: needs router='sigmoid_bias'")
        load = self.expert_load
        self.routing_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class PyramidMoE(nn.ModuleList):
    """DeepSpeed-MoE's PR-MoE layout: one Residual-MoE layer (`SparseMoE` with ``residual=True``,
    top-``k`` experts as a correction of a dense MLP) per MoE position of a model, with its own
    expert count, typically more experts in later layers (e.g. ``[32] * 10 + [64] * 2``).

    ``pyramid[i](x)`` runs the MoE of position ``i``; other `SparseMoE` options pass through.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: Sequence[int], k: int = 1, **kwargs):
        experts = list(num_experts)
        if not experts:
            raise ValueError("PyramidMoE: num_experts must list the expert count of at least one layer, got []")
        super().__init__(SparseMoE(d_model, d_ff, e, k, residual=True, **kwargs) for e in experts)


def temperature_schedule(step: int, total_steps: int, *, start: float = 2.0, end: float = 0.5) -> float:
    """Router temperature annealed geometrically from ``start`` to ``end`` over ``total_steps``
    (dense-to-sparse gating, Nie et al. 2021: a high temperature spreads the gate weights over the
    experts early in training, a low one makes them sharp later); ``end`` after ``total_steps``.
    Set ``layer.temperature = temperature_schedule(step, total)`` before each step."""
    if not (start > 0 and end > 0):
        raise ValueError(f"temperature_schedule: start and end must be > 0, got {start} and {end}")
    check_int("temperature_schedule", "total_steps", total_steps, low=1)
    fraction = min(max(step, 0), total_steps) / total_steps
    return start * (end / start) ** fraction


class _DenseMLP(nn.Module):
    """``w_down @ act(w_gate_up @ x)`` for every token (the shared experts)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, **factory):
        super().__init__()
        self.activation = activation
        self.w_gate_up = nn.Linear(d_model, activations.hidden_width(activation, d_ff), bias=False, **factory)
        self.w_down = nn.Linear(d_ff, d_model, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(activations.apply(self.w_gate_up(x), self.activation))
