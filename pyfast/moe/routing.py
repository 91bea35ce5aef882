"""The `Routing` record that connects `permute`, grouped expert compute and `unpermute`."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class Routing(NamedTuple):
    """Where every (token, slot) assignment lives in the expert-grouped layout.

    Rows of ``x_sorted`` are grouped by expert: expert ``e`` owns rows
    ``offsets[e] : offsets[e] + counts[e]``; rows after that up to ``offsets[e + 1]`` are
    padding (present only with ``align``) and hold zeros. Within an expert, assignments are
    ordered by slot first (every top-1 choice before any top-2 choice), then by token index;
    with ``capacity`` the first ``capacity`` assignments in that order are kept.

    Fields:
        counts: ``(E,) int64`` kept assignments per expert.
        offsets: ``(E + 1,) int64`` start row of each expert's segment; each start is a multiple
            of ``align`` when given; ``offsets[E]`` is the number of rows in use.
        row_of_assignment: ``(T, k) int64`` row of ``x_sorted`` holding token ``t``'s ``j``-th
            choice, or -1 when the assignment was dropped by ``capacity``.
        assignment_of_row: ``(R,) int64`` flat assignment index ``t * k + j`` held by each row,
            or -1 for padding and unused rows.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    row_of_assignment: torch.Tensor
    assignment_of_row: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def top_k(self) -> int:
        return self.row_of_assignment.shape[1]

    @property
    def dropped(self) -> torch.Tensor:
        """``(T, k) bool``: assignments removed by the capacity limit."""
        return self.row_of_assignment < 0

    @property
    def token_of_row(self) -> torch.Tensor:
        """``(R,) int64``: source token of each row of ``x_sorted``, -1 for padding."""
        a = self.assignment_of_row
        return torch.where(a >= 0, a // self.top_k, a)


def num_rows(tokens: int, k: int, num_experts: int, capacity: Optional[int], align: Optional[int]) -> int:
    """Static row count R of ``x_sorted``: an upper bound on the used rows that depends only on
    shapes, so the layout has the same size for every routing decision (torch.compile friendly)."""
    kept = tokens * k if capacity is None else min(tokens * k, num_experts * capacity)
    pad = 0 if align is None or kept == 0 else num_experts * (align - 1)
    return kept + pad


def expert_capacity(tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int = 4) -> int:
    """GShard / DeepSpeed-MoE capacity: ``ceil(tokens / E * capacity_factor * k)``, at least
    ``min_capacity``."""
    if capacity_factor <= 0:
        raise ValueError(f"expert_capacity: capacity_factor must be > 0, got {capacity_factor}")
    return max(min_capacity, math.ceil(tokens / num_experts * capacity_factor * k))
