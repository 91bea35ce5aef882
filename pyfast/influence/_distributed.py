"""Data parallelism of the `Analyzer` over ``torch.distributed``: every rank is given the same data
and takes every ``world``-th batch; statistics are summed over ranks (with their token and example
counts, so means are global), scores are gathered back into the data's order."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world(group: Optional[object]) -> Tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum_(tensors: List[Tensor], group: Optional[object]) -> None:
    """Sum each tensor over the ranks of ``group``, in place."""
    if rank_and_world(group)[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def gather_batches(parts: Dict[str, List[Tuple[int, Tensor]]], group: Optional[object]) -> Dict[str, Tensor]:
    """Per key, this rank's ``(batch index, scores (..., b_k))`` pieces and every other rank's,
    concatenated along the last dimension in batch order."""
    if rank_and_world(group)[1] > 1:
        device = next((t.device for pieces in parts.values() for _, t in pieces), torch.device("cpu"))
        local = {key: [(k, t.cpu()) for k, t in pieces] for key, pieces in parts.items()}
        everyone: List[Optional[dict]] = [None] * rank_and_world(group)[1]
        dist.all_gather_object(everyone, local, group=group)
        parts = {key: [(k, t.to(device)) for rank_parts in everyone for k, t in rank_parts[key]] for key in parts}
    return {key: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=-1) for key, pieces in parts.items()}
