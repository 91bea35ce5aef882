"""Router math of `SparseMoE` beyond plain top-k gating, in batched static-shape torch (traceable
by ``torch.compile(fullgraph=True)``; no data-dependent shapes, no host syncs).

- Activation dense-to-sparse gate (Nguyen, Akbarian, Ho 2024, "Is Temperature Sample Efficient
  for Softmax Gaussian MoE?"): ``softmax((act(W x) + b) / tau)``, an activation between the
  router's linear map and the temperature softmax.
- ProMoE prototypical routing (Wei et al. 2025, eq. 4): scores ``alpha * cos(x, p_e)`` against
  learnable expert prototypes, top-k of the scores with the scores themselves as gate weights
  (identity activation), and the routing contrastive loss (eq. 6).
- Read-ME pre-gating helpers: `RoutingDecision` (a routing computed ahead of the layer) and
  `batch_by_expert` (requests grouped by expert, for weight prefetch and expert-aware batching).

The float64 specifications are in `pyfast.moe.reference`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import route

GATE_ACTIVATIONS = ("tanh", "sigmoid")


class RoutingDecision(NamedTuple):
    """A routing of T tokens over E experts, computed before (or apart from) the MoE layer.

    weights: ``(T, k)`` gate weights; experts: ``(T, k)`` int32/int64 expert ids; logits:
    ``(T, E)`` the router's scores (used for the aux losses).
    """

    weights: Tensor
    experts: Tensor
    logits: Tensor


def activated_logits(scores: Tensor, activation: str, offset: Tensor) -> Tensor:
    """``act(scores) + offset``: the activation dense-to-sparse gate's logits before ``/ tau``.

    scores: ``(T, E)`` the router's linear output ``W x``; offset: ``(E,)`` the gate bias
    ``beta_0``; activation: ``"tanh"`` or ``"sigmoid"`` (bounded activations that meet the
    paper's independence conditions, unlike the identity)."""
    act = torch.tanh(scores) if activation == "tanh" else torch.sigmoid(scores)
    return act + offset


def prototype_scores(x: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """``(T, E)`` ProMoE scores ``scale * cos(x_t, p_e)`` for ``x (T, d)``, ``prototypes (E, d)``."""
    return scale * F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).T


def prototype_topk(scores: Tensor, k: int):
    """``(weights (T, k), experts (T, k) int32)``: the k largest scores (ties to the lower index)
    and the scores themselves as gate weights (ProMoE's identity score activation)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order.to(torch.int32)


def routing_contrastive_loss(x: Tensor, experts: Tensor, prototypes: Tensor, temperature: float, token_mask: Tensor) -> Tensor:
    """ProMoE's routing contrastive loss (eq. 6) over the experts that received tokens.

    ``m_e`` = mean of the tokens ``x (T, d)`` routed to expert e (any of the k slots of
    ``experts (T, k)``, only tokens with ``token_mask (T,) bool``); with ``A`` the experts whose
    ``m_e`` exists, ``L = -1/|A| sum_{i in A} log softmax_{j in A}(cos(p_i, m_j) / temperature)_i``.
    Pulls each prototype toward its tokens' centroid, pushes it from the other centroids.
    Differentiable w.r.t. ``x`` and ``prototypes``; 0 when no token is routed.
    """
    num_experts = prototypes.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    picked = F.one_hot(experts.long(), num_experts).amax(dim=1).to(acc) * token_mask[:, None].to(acc)  # (T, E)
    counts = picked.sum(dim=0)
    centroids = (picked.T @ x.to(acc)) / counts.clamp(min=1)[:, None]
    active = counts > 0
    sim = F.normalize(prototypes.to(acc), dim=-1) @ F.normalize(centroids, dim=-1).T / temperature
    sim = sim.masked_fill(~active[None, :], torch.finfo(acc).min)
    per_expert = -torch.log_softmax(sim, dim=-1).diagonal()
    return torch.where(active, per_expert, 0.0).sum() / active.sum().clamp(min=1)


class ExpertBatches(NamedTuple):
    """Tokens (or requests) grouped by expert: expert e serves ``tokens[offsets[e]:offsets[e + 1]]``.

    tokens: ``(T * k,) int64`` token index of each assignment, grouped by expert (slot-then-token
    order within an expert); offsets: ``(E + 1,) int64``; touched: ``(E,) bool`` experts with at
    least one token (the expert weights to fetch ahead)."""

    tokens: Tensor
    offsets: Tensor
    touched: Tensor


def batch_by_expert(experts: Tensor, num_experts: int) -> ExpertBatches:
    """Group the ``(T, k)`` expert choices of a `RoutingDecision` (e.g. from `PreGatingRouter`, known
    before the layer runs) by expert, so each expert's weights are read once for its batch."""
    routing = route(experts, num_experts)
    return ExpertBatches(routing.token_of_row, routing.offsets, routing.counts > 0)
