"""Sparse Mixture-of-Experts routing: top-k gating, expert grouping, weighted combine, aux losses.

    weights, experts = pyfast.moe.topk_gating(router_logits, k=2)
    x_sorted, routing = pyfast.moe.permute(x, experts, num_experts=8)
    y_sorted = expert_mlps(x_sorted, routing.offsets)            # rows grouped by expert
    out = pyfast.moe.unpermute(y_sorted, weights, routing)       # (T, d)
"""
from . import reference
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
from .routing import Routing, expert_capacity, num_rows

__all__ = [
    "MAX_EXPERTS",
    "MAX_K",
    "Routing",
    "expert_capacity",
    "load_balancing_loss",
    "num_rows",
    "permute",
    "reference",
    "route",
    "router_z_loss",
    "topk_gating",
    "unpermute",
]
