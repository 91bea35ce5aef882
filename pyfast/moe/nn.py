"""``nn.Module`` layers built on the pyfast.moe ops."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from . import activations, routers
from .experts import moe_mlp
from .ops import load_balancing_loss, router_z_loss, topk_gating
from .parallel import expert_parallel_mlp, expert_shard
from .routing import expert_capacity

__all__ = ["MoEAuxLosses", "PreGatingRouter", "PyramidMoE", "SparseMoE", "temperature_schedule"]

ROUTERS = ("softmax", "sigmoid_bias", "activated_softmax", "prototype")


class MoEAuxLosses(NamedTuple):
    """Auxiliary losses of one MoE layer (unweighted; add ``w * loss`` to the training loss).

    load_balancing: Switch / GShard ``E * sum_e f_e P_e`` (1 under uniform routing).
    router_z: ST-MoE ``mean_t logsumexp(logits_t)^2``.
    routing_contrastive: ProMoE's routing contrastive loss (`routers.routing_contrastive_loss`)
        for ``router="prototype"`` (over the conditional tokens), 0 for the other routers.

    load_balancing and router_z use the router's scores and choices of every token (for
    ``"prototype"`` the cosine scores, unconditional tokens included).
    """

    load_balancing: Tensor
    router_z: Tensor
    routing_contrastive: Tensor


class SparseMoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer: router, top-k gating, experts, combine.

    ``y = sum_j g_j(x) * expert_{e_j}(x) + shared(x)``, each expert an MLP
    ``w_down[e] @ act(w_gate_up[e] @ x)`` run by `pyfast.moe.moe_mlp`.

    Args:
        d_model: features of x.
        d_ff: hidden units of each expert.
        num_experts: E routed experts.
        k: experts per token.
        router: how the k experts and their gate weights are chosen:
            ``"softmax"``: top-k of ``softmax(W x / temperature)``, weights renormalized over the k.
            ``"sigmoid_bias"``: sigmoid scores with a routing-only bias, DeepSeek-V3's aux-loss-free
            balancing (call `update_routing_bias` after each optimizer step).
            ``"activated_softmax"``: the activation dense-to-sparse gate of Nguyen et al. 2024,
            top-k of ``softmax((act(W x) + b) / temperature)`` with ``act = gate_activation`` and a
            learnable ``b`` (``gate_offset``); anneal ``temperature`` as for ``"softmax"``.
            ``"prototype"``: ProMoE's prototypical routing, scores ``prototype_scale * cos(x, p_e)``
            against learnable ``prototypes (E, d_model)``, the top-k scores as gate weights, and the
            routing contrastive loss in the aux losses (temperature ``contrastive_temperature``).
        activation: expert activation (see `pyfast.moe.activations`); ``"swiglu"`` by default.
        capacity_factor: drop assignments beyond ``ceil(T / E * capacity_factor * k)`` per expert
            (slot-then-token priority); None keeps every assignment (dropless).
        num_shared_experts: always-on experts (DeepSeekMoE), each of width ``d_ff``, added to the output.
        residual: DeepSpeed-MoE's Residual-MoE: a dense expert of width ``d_ff`` beside the routed
            ones, mixed per token as ``c_0 * moe(x) + c_1 * mlp(x)``, ``c = softmax(Linear(d_model, 2)(x))``
            (usually with ``k=1``: the routed expert acts as a correction of the dense MLP).
        num_unconditional_experts: ProMoE's conditional routing (``router="prototype"``, at most k):
            tokens marked by ``forward(..., unconditional=mask)`` skip the router and go to these
            experts with weight 1 (their remaining ``k - num_unconditional_experts`` slots carry weight 0).
        temperature: softmax temperature of the router (a float; may be changed between steps,
            e.g. annealed from dense to sparse gating with `temperature_schedule`).
        gate_activation: ``"tanh"`` or ``"sigmoid"``, the activation of ``"activated_softmax"``.
        prototype_scale, contrastive_temperature: ProMoE's ``alpha`` (eq. 4) and ``tau`` (eq. 6).
        bias_update_rate: step of the routing-bias update of ``"sigmoid_bias"``.
        process_group: expert parallelism (`pyfast.moe.parallel`): a ``torch.distributed`` process
            group (e.g. ``torch.distributed.group.WORLD``) of W ranks; this rank then holds only its
            block of ``num_experts / W`` routed experts (from ``expert_start``) and exchanges tokens
            with the other ranks, which must run the layer in the same step. The router, shared and
            residual experts stay replicated. None: all experts local.

    Parameters: ``w_gate_up (n, h, d_model)`` and ``w_down (n, d_model, d_ff)`` hold every expert
    of this rank: the routed ones, then the unconditional, shared and residual experts. Without
    ``process_group`` and ``capacity_factor`` the shared and residual experts run in the same
    `moe_mlp` call as the routed ones (always-selected extra choices), so x is read once.

    Shapes: ``forward(x (..., d_model), *, unconditional=None, decision=None) -> (y (..., d_model),
    MoEAuxLosses)``; ``unconditional``: bool ``x.shape[:-1]`` (ProMoE); ``decision``: a
    `RoutingDecision` for the ``T = x[..., 0].numel()`` tokens computed ahead of the layer (Read-ME
    pre-gating, `PreGatingRouter`), used instead of this layer's router.
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
        num_unconditional_experts: int = 0,
        temperature: float = 1.0,
        gate_activation: str = "tanh",
        prototype_scale: float = 1.0,
        contrastive_temperature: float = 0.1,
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
        check_choice(fn, "gate_activation", gate_activation, routers.GATE_ACTIVATIONS)
        check_int(fn, "num_unconditional_experts", num_unconditional_experts, low=0, high=k, what=f"at most k={k}")
        if num_unconditional_experts and (router != "prototype" or process_group is not None):
            raise ValueError(f"{fn}: num_unconditional_experts needs router='prototype' and no process_group")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"{fn}: capacity_factor must be > 0 or None, got {capacity_factor}")
        for name, value in (("temperature", temperature), ("contrastive_temperature", contrastive_temperature)):
            if not value > 0:
                raise ValueError(f"{fn}: {name} must be > 0, got {value}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.router, self.activation, self.gate_activation = router, activation, gate_activation
        self.capacity_factor, self.temperature, self.bias_update_rate = capacity_factor, temperature, bias_update_rate
        self.prototype_scale, self.contrastive_temperature = prototype_scale, contrastive_temperature
        self.gate = self.gate_offset = self.prototypes = None
        if router == "prototype":
            self.prototypes = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        else:
            self.gate = nn.Linear(d_model, num_experts, bias=False, **factory)
        if router == "activated_softmax":
            self.gate_offset = nn.Parameter(torch.zeros(num_experts, **factory))
        self.process_group = process_group
        self.expert_start, self.num_local_experts = 0, num_experts
        if process_group is not None:
            self.expert_start, self.num_local_experts = expert_shard(num_experts, process_group)
        self.num_unconditional_experts, self.num_shared_experts = num_unconditional_experts, num_shared_experts
        self.coefficient = nn.Linear(d_model, 2, **factory) if residual else None
        # Bank rows: routed (local), unconditional, then always-selected extras (shared, residual).
        self.num_routed_rows = self.num_local_experts + num_unconditional_experts
        self.num_extra_experts = num_shared_experts + int(residual)
        rows = self.num_routed_rows + self.num_extra_experts
        width = activations.hidden_width(activation, d_ff)
        self.w_gate_up = nn.Parameter(torch.empty(rows, width, d_model, **factory))
        self.w_down = nn.Parameter(torch.empty(rows, d_model, d_ff, **factory))
        self.register_buffer("routing_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(self.d_ff))
        if self.gate is not None:
            self.gate.reset_parameters()
        if self.prototypes is not None:
            nn.init.normal_(self.prototypes)
        if self.coefficient is not None:
            self.coefficient.reset_parameters()

    def route(self, flat: Tensor) -> routers.RoutingDecision:
        """This layer's routing of ``flat (T, d_model)``: ``RoutingDecision(weights, experts, logits)``."""
        if self.router == "prototype":
            logits = routers.prototype_scores(flat, self.prototypes, self.prototype_scale)
            return routers.RoutingDecision(*routers.prototype_topk(logits, self.k), logits)
        logits = self.gate(flat)
        if self.router == "activated_softmax":
            logits = routers.activated_logits(logits, self.gate_activation, self.gate_offset)
        sigmoid = self.router == "sigmoid_bias"
        weights, experts = topk_gating(
            logits, self.k, score="sigmoid" if sigmoid else "softmax", temperature=self.temperature,
            bias=self.routing_bias if sigmoid else None,
        )
        return routers.RoutingDecision(weights, experts, logits)

    def forward(self, x: Tensor, *, unconditional: Optional[Tensor] = None, decision: Optional[routers.RoutingDecision] = None):
        fn = "SparseMoE"
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{fn}: x must have d_model={self.d_model} features in its last axis, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        if decision is None:
            decision = self.route(flat)
        else:
            self._check_decision(decision, flat.shape[0])
        weights, experts, logits = decision
        routed_weights, routed_experts = weights, experts
        token_mask = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
        if unconditional is not None:
            if not self.num_unconditional_experts:
                raise ValueError(f"{fn}: unconditional needs num_unconditional_experts > 0")
            if unconditional.dtype != torch.bool or unconditional.shape != x.shape[:-1]:
                raise ValueError(
                    f"{fn}: unconditional must be a bool mask of shape {tuple(x.shape[:-1])}, "
                    f"got {unconditional.dtype} {tuple(unconditional.shape)}"
                )
            token_mask = ~unconditional.reshape(-1)
            weights, experts = self._conditional_routing(token_mask, weights, experts)
        out = self._experts(flat, weights, experts)
        if self.training and self.router == "sigmoid_bias":
            with torch.no_grad():
                ids = routed_experts.reshape(-1).long()
                self.expert_load.index_add_(0, ids, self.expert_load.new_ones(ids.numel()))
        contrastive = logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        if self.router == "prototype":
            contrastive = routers.routing_contrastive_loss(
                flat, routed_experts, self.prototypes, self.contrastive_temperature, token_mask
            )
        aux = MoEAuxLosses(load_balancing_loss(logits, routed_experts), router_z_loss(logits), contrastive)
        return out.reshape(x.shape), aux

    def _check_decision(self, decision, tokens: int) -> None:
        fn = "SparseMoE"
        if not isinstance(decision, routers.RoutingDecision):
            raise TypeError(f"{fn}: decision must be a RoutingDecision, got {type(decision).__name__}")
        shapes = tuple(tuple(t.shape) for t in decision)
        if shapes != ((tokens, self.k), (tokens, self.k), (tokens, self.num_experts)):
            raise ValueError(
                f"{fn}: decision must hold weights ({tokens}, {self.k}), experts ({tokens}, {self.k}) and "
                f"logits ({tokens}, {self.num_experts}) for the {tokens} tokens of x, got {shapes}"
            )

    def _conditional_routing(self, conditional: Tensor, weights: Tensor, experts: Tensor):
        """ProMoE step 1: unconditional tokens take the unconditional experts (bank rows after the
        routed ones) with weight 1 in their first slots, weight 0 in the rest."""
        slot = torch.arange(self.k, device=experts.device)
        u_experts = (self.num_experts + slot % self.num_unconditional_experts).to(experts.dtype)
        u_weights = (slot < self.num_unconditional_experts).to(weights.dtype)
        keep = conditional[:, None]
        return torch.where(keep, weights, u_weights), torch.where(keep, experts, u_experts)

    def _experts(self, flat: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Routed experts plus the always-selected extras (shared, residual), in one `moe_mlp` call
        when no capacity limit or expert parallelism applies."""
        tokens = flat.shape[0]
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(tokens, self.num_experts, self.k, self.capacity_factor)
        extra_weights = weights.new_ones(tokens, self.num_shared_experts)
        if self.coefficient is not None:
            c = torch.softmax(self.coefficient(flat), dim=-1).to(weights.dtype)
            weights = weights * c[:, :1]
            extra_weights = torch.cat([extra_weights, c[:, 1:]], dim=1)
        if self.num_extra_experts and capacity is None and self.process_group is None:
            extra = torch.arange(self.num_routed_rows, self.w_down.shape[0], device=experts.device, dtype=experts.dtype)
            weights = torch.cat([weights, extra_weights], dim=1)
            experts = torch.cat([experts, extra.expand(tokens, -1)], dim=1)
            return moe_mlp(flat, self.w_gate_up, self.w_down, weights, experts, activation=self.activation)
        routed = slice(0, self.num_routed_rows)
        if self.process_group is None:
            out = moe_mlp(
                flat, self.w_gate_up[routed], self.w_down[routed], weights, experts,
                activation=self.activation, capacity=capacity,
            )
        else:
            out = expert_parallel_mlp(
                flat, self.w_gate_up[routed], self.w_down[routed], weights, experts, self.process_group,
                activation=self.activation, capacity=capacity,
            )
        for i in range(self.num_extra_experts):
            e = self.num_routed_rows + i
            hidden = activations.apply(flat @ self.w_gate_up[e].T, self.activation)
            out = out + extra_weights[:, i:i + 1].to(out.dtype) * (hidden @ self.w_down[e].T)
        return out

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


class PreGatingRouter(nn.Module):
    """Read-ME's pre-gating router (Cai et al., NeurIPS 2024): a router decoupled from the MoE
    layers that computes their expert choices ahead of time from an earlier hidden state, so the
    serving system knows each token's experts before the layers run (prefetch the touched experts'
    weights, batch requests by expert with `pyfast.moe.routers.batch_by_expert`).

    ``forward(h (..., d_model)) -> [RoutingDecision] * num_layers``: top-k softmax gating (with
    ``temperature``) of one linear map per later layer; pass ``decision=decisions[i]`` to the i-th
    `SparseMoE` (same ``num_experts`` and ``k``). The decisions are differentiable w.r.t. the router.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, num_layers: int = 1, *, temperature: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        fn = "PreGatingRouter"
        check_int(fn, "d_model", d_model, low=1)
        check_int(fn, "num_experts", num_experts, low=1)
        check_int(fn, "k", k, low=1, high=num_experts, what=f"at most num_experts={num_experts}")
        check_int(fn, "num_layers", num_layers, low=1)
        if not temperature > 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
        self.d_model, self.num_experts, self.k, self.num_layers = d_model, num_experts, k, num_layers
        self.temperature = temperature
        self.gate = nn.Linear(d_model, num_layers * num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, h: Tensor) -> List[routers.RoutingDecision]:
        if h.shape[-1] != self.d_model:
            raise ValueError(f"PreGatingRouter: h must have d_model={self.d_model} features in its last axis, got shape {tuple(h.shape)}")
        logits = self.gate(h.reshape(-1, self.d_model)).unflatten(-1, (self.num_layers, self.num_experts))
        decisions = []
        for layer in range(self.num_layers):
            layer_logits = logits[:, layer]
            weights, experts = topk_gating(layer_logits, self.k, temperature=self.temperature)
            decisions.append(routers.RoutingDecision(weights, experts, layer_logits))
        return decisions


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
