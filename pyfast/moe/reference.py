"""Specification of pyfast's MoE ops (routing and expert compute) in plain torch.

Every kernel in `pyfast.moe` is tested against these functions. They accept any floating dtype
(float64 included), compute in at least float32, and get their gradients from torch autograd.

Shapes: T tokens, E experts, k choices per token, d features, R rows of the grouped layout
(`routing.num_rows`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import activations
from .routing import Routing, num_rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_gating(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    temperature: Union[float, torch.Tensor] = 1.0,
    renormalize: bool = True,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating: ``(weights (T, k) logits.dtype, experts (T, k) int32)``.

    ``z = logits / temperature``; scores ``p = softmax(z)`` or ``sigmoid(z)``. The k experts with
    the largest selection key are chosen, in descending key order, ties to the lowest expert index.
    The key is ``z`` itself (softmax and sigmoid are monotone) or ``p + bias`` when a routing-only
    ``bias (E,)`` is given; the bias never enters the weights. ``weights = p[experts]``, divided by
    their sum when ``renormalize``.
    """
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    probs = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
    key = z if bias is None else probs + bias.to(z.dtype)
    experts = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, experts)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts.to(torch.int32)


def route(
    experts: torch.Tensor,
    num_experts: int,
    *,
    capacity: Optional[int] = None,
    align: Optional[int] = None,
) -> Routing:
    """Group the ``(T, k)`` assignments by expert (see `Routing` for the layout and priority)."""
    tokens, k = experts.shape
    device = experts.device
    # Priority order p = j * T + t: every slot-0 choice, then every slot-1 choice, ...
    by_priority = experts.t().reshape(-1).long()
    order = torch.sort(by_priority, stable=True).indices
    sorted_experts = by_priority[order]
    counts_all = _histogram(by_priority, num_experts)
    starts_all = torch.cumsum(counts_all, 0) - counts_all
    position = torch.arange(order.numel(), device=device) - starts_all[sorted_experts]

    counts = counts_all if capacity is None else counts_all.clamp(max=capacity)
    kept = torch.ones_like(position, dtype=torch.bool) if capacity is None else position < capacity
    segment = counts if align is None else (counts + align - 1) // align * align
    offsets = torch.cat([segment.new_zeros(1), torch.cumsum(segment, 0)])

    rows = torch.where(kept, offsets[sorted_experts] + position, -1)
    assignment = (order % tokens) * k + order // tokens if tokens else order
    row_of_assignment = torch.empty(tokens * k, dtype=torch.int64, device=device)
    row_of_assignment[assignment] = rows
    # Dropped assignments write -1 into an extra last slot that is cut off.
    total = num_rows(tokens, k, num_experts, capacity, align)
    assignment_of_row = torch.full((total + 1,), -1, dtype=torch.int64, device=device)
    assignment_of_row[torch.where(kept, rows, total)] = torch.where(kept, assignment, -1)
    return Routing(counts, offsets, row_of_assignment.view(tokens, k), assignment_of_row[:total])


def _histogram(ids: torch.Tensor, bins: int) -> torch.Tensor:
    """``(bins,) int64`` occurrences of each id (a static-shape bincount)."""
    return torch.zeros(bins, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def gather_rows(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``x_sorted (R, d)``: row r holds ``x[token_of_row[r]]``, zeros for padding rows."""
    token = routing.token_of_row
    rows = x[token.clamp(min=0)]
    return torch.where((token >= 0)[:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))


def permute(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    *,
    capacity: Optional[int] = None,
    align: Optional[int] = None,
) -> Tuple[torch.Tensor, Routing]:
    """Tokens ``x (T, d)`` grouped by expert: ``(x_sorted (R, d), routing)``."""
    routing = route(experts, num_experts, capacity=capacity, align=align)
    return gather_rows(x, routing), routing


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] y_sorted[row[t, j]]``,
    ``(T, d)`` in ``y_sorted.dtype``; dropped assignments contribute zero."""
    acc = compute_dtype(y_sorted.dtype)
    rows = routing.row_of_assignment
    kept = rows >= 0
    picked = y_sorted.to(acc)[rows.clamp(min=0)]
    w = torch.where(kept, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))
    return (picked * w[..., None]).sum(dim=1).to(y_sorted.dtype)


def load_balancing_loss(router: torch.Tensor, experts: torch.Tensor, *, input: str = "logits") -> torch.Tensor:
    """Switch / GShard balance loss ``E * sum_e f_e P_e``.

    ``f_e``: fraction of the ``T * k`` assignments routed to expert e; ``P_e``: mean router
    probability of expert e over tokens (softmax of ``router`` when ``input == "logits"``, ``router``
    itself when ``input == "probs"``). Equals 1 under perfectly uniform routing; 0 when T = 0.
    Gradient flows through ``P`` only.
    """
    tokens, num_experts = router.shape
    r = router.to(compute_dtype(router.dtype))
    if tokens == 0:
        return r.sum()  # 0, still attached to the graph
    probs = torch.softmax(r, dim=-1) if input == "logits" else r
    fraction = _histogram(experts.reshape(-1).long(), num_experts).to(r.dtype) / experts.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``; 0 when T = 0."""
    z = torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1)
    if z.numel() == 0:
        return z.sum()  # 0, still attached to the graph
    return (z * z).mean()


def grouped_mm(x_sorted: torch.Tensor, w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Per-expert GEMMs over the grouped rows: ``(R, n)`` in ``x_sorted.dtype``.

    ``w`` is ``(E, n, k)`` (the ``nn.Linear`` layout of each expert: out features, in features).
    Rows ``offsets[e] : offsets[e] + counts[e]`` of ``x_sorted (R, k)`` are multiplied by
    ``w[e].T``; padding and unused rows give zeros. Computed in float32 (float64 for float64).
    """
    acc = compute_dtype(x_sorted.dtype)
    out = x_sorted.new_zeros((x_sorted.shape[0], w.shape[1]), dtype=acc)
    starts, counts = routing.offsets.tolist(), routing.counts.tolist()
    for e, (start, count) in enumerate(zip(starts, counts)):
        rows = slice(start, start + count)
        out[rows] = x_sorted[rows].to(acc) @ w[e].to(acc).T
    return out.to(x_sorted.dtype)


def moe_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    *,
    activation: str = "swiglu",
    capacity: Optional[int] = None,
) -> torch.Tensor:
    """Sparse expert MLP, the loop over experts: ``(T, d)`` in ``x.dtype``.

    ``out[t] = sum_j weights[t, j] * w_down[e] @ act(w_gate_up[e] @ x[t])`` with ``e = experts[t, j]``,
    over the assignments kept by ``route(experts, E, capacity=capacity)``. Shapes: ``x (T, d)``,
    ``w_gate_up (E, h, d)`` with ``h = 2 * ffn`` for gated activations (gate rows first) else ``ffn``,
    ``w_down (E, d, ffn)``, ``weights (T, k)``, ``experts (T, k)``. Computed in float32 (float64 for
    float64) and rounded once.
    """
    acc = compute_dtype(x.dtype)
    num_experts = w_gate_up.shape[0]
    kept = route(experts, num_experts, capacity=capacity).row_of_assignment >= 0
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in range(num_experts):
        token, slot = torch.where((experts == e) & kept)
        hidden = x[token].to(acc) @ w_gate_up[e].to(acc).T
        y = activations.apply(hidden, activation) @ w_down[e].to(acc).T
        out = out.index_add(0, token, y * weights[token, slot].to(acc)[:, None])
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Routers of `SparseMoE` beyond top-k gating (specifications of `pyfast.moe.routers`)
# --------------------------------------------------------------------------------------------------


def activated_gating(
    scores: torch.Tensor, k: int, *, activation: str, offset: torch.Tensor, temperature: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Activation dense-to-sparse gate (Nguyen et al. 2024): the top-k of
    ``softmax((act(scores) + offset) / temperature)``, weights renormalized over the k choices.
    ``scores (T, E)`` is the router's linear output, ``act`` is tanh or sigmoid, ``offset (E,)``."""
    act = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
    return topk_gating(act(scores) + offset, k, temperature=temperature)


def prototype_gating(
    x: torch.Tensor, prototypes: torch.Tensor, k: int, *, scale: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ProMoE prototypical routing (Wei et al. 2025, eq. 4, identity score activation):
    ``(scores (T, E), weights (T, k), experts (T, k) int32)`` with ``scores = scale * cos(x_t, p_e)``,
    the k largest scores chosen (ties to the lower index) and used as the gate weights."""
    acc = compute_dtype(x.dtype)
    scores = scale * torch.nn.functional.cosine_similarity(x.to(acc)[:, None, :], prototypes.to(acc)[None], dim=-1)
    experts = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return scores, scores.gather(1, experts), experts.to(torch.int32)


def routing_contrastive_loss(
    x: torch.Tensor,
    experts: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float,
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ProMoE routing contrastive loss (eq. 6): over the experts A that received tokens,
    ``-1/|A| sum_{i in A} log( exp(cos(p_i, m_i) / tau) / sum_{j in A} exp(cos(p_i, m_j) / tau) )``,
    ``m_e`` the mean of the tokens ``x (T, d)`` with e among their choices ``experts (T, k)``
    (tokens with ``token_mask`` only). 0 when no token is routed."""
    acc = compute_dtype(x.dtype)
    x, p = x.to(acc), prototypes.to(acc)
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if token_mask is None else token_mask
    active, centroids = [], []
    for e in range(p.shape[0]):
        chosen = (experts == e).any(dim=1) & keep
        if chosen.any():
            active.append(e)
            centroids.append(x[chosen].mean(dim=0))
    if not active:
        return (x.sum() + p.sum()) * 0
    terms = []
    for i, e in enumerate(active):
        sims = torch.stack([torch.nn.functional.cosine_similarity(p[e], m, dim=0) for m in centroids]) / temperature
        terms.append(-torch.log_softmax(sims, dim=0)[i])
    return torch.stack(terms).mean()
