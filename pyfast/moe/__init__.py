"""Sparse Mixture-of-Experts: top-k gating, expert grouping, grouped expert GEMMs, the fused
expert MLP, weighted combine, aux losses.

    weights, experts = pyfast.moe.topk_gating(router_logits, k=2)
    x_sorted, routing = pyfast.moe.permute(x, experts, num_experts=8)
    y_sorted = expert_mlps(x_sorted, routing.offsets)            # rows grouped by expert
    out = pyfast.moe.unpermute(y_sorted, weights, routing)       # (T, d)

    # or the whole expert MLP in one op (gather, GEMM + activation, GEMM, weighted combine):
    out = pyfast.moe.moe_mlp(x, w_gate_up, w_down, weights, experts)  # w_gate_up (E, 2*ffn, d), w_down (E, d, ffn)
"""
from . import activations, nn, parallel, reference, routers
from .experts import grouped_mm, moe_mlp
from .hf import patch_hf
from .ops import (
    MAX_EXPERTS,
    MAX_K,
    load_balancing_loss,
    permute,
    route,
    router_z_loss,
    topk_gating,
    unpermute,
)
from .parallel import expert_parallel_mlp, expert_shard
from .routers import RoutingDecision, batch_by_expert
from .routing import Routing, expert_capacity, num_rows

__all__ = [
    "MAX_EXPERTS",
    "MAX_K",
    "Routing",
    "RoutingDecision",
    "activations",
    "batch_by_expert",
    "nn",
    "expert_capacity",
    "expert_parallel_mlp",
    "expert_shard",
    "grouped_mm",
    "load_balancing_loss",
    "moe_mlp",
    "num_rows",
    "parallel",
    "patch_hf",
    "permute",
    "reference",
    "route",
    "routers",
    "router_z_loss",
    "topk_gating",
    "unpermute",
]
