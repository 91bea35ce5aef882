"""Routing: group the (T, k) expert choices by expert, deterministically and without atomics.

Priority order of the assignments is slot j first, then token t (reference.route). Tiling: the
tokens are cut into chunks of CHUNK_T; program (chunk, j) handles slot j of one chunk, walking
it in BLOCK_T-token sub-blocks with a (BLOCK_T, BLOCK_E) one-hot tile.

1. `_route_count_kernel`: per (slot, chunk) expert counts -> (k * n_chunks, E) int32.
2. torch.cumsum over that small tensor (row order = priority order) gives every (slot, chunk)
   the number of earlier assignments of each expert; the (E,) counts, capacity clamp, align
   rounding and segment offsets are small torch ops on the device (no host sync).
3. `_route_assign_kernel`: position of an assignment within its expert = chunk start + running
   count of earlier sub-blocks + rank inside the sub-block (tl.cumsum of the one-hot along
   tokens); kept when position < capacity; row = offsets[e] + position.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc

from ._utils import MIN_PROGRAMS, TILE_ELEMENTS, num_warps, pow2_block


@triton.jit
def _route_count_kernel(
    experts_ptr,
    block_counts_ptr,
    bad_ptr,
    T,
    E,
    K: tl.constexpr,
    CHECK: tl.constexpr,
    CHUNK_T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0)
    j = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    bad = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for start in range(0, CHUNK_T, BLOCK_T):
        t = chunk * CHUNK_T + start + tl.arange(0, BLOCK_T)
        t_mask = t < T
        e = tl.load(experts_ptr + t.to(tl.int64) * K + j, mask=t_mask, other=-1)
        onehot = (e[:, None] == cols[None, :]) & col_mask[None, :]
        counts += tl.sum(onehot.to(tl.int32), axis=0)
        if CHECK:
            bad += (t_mask & ((e < 0) | (e >= E))).to(tl.int32)
    slot = j * n_chunks + chunk
    tl.store(block_counts_ptr + slot.to(tl.int64) * E + cols, counts, mask=col_mask)
    if CHECK:
        tl.store(bad_ptr + slot, tl.sum(bad, axis=0))


@triton.jit
def _route_assign_kernel(
    experts_ptr,
    starts_ptr,
    offsets_ptr,
    row_of_assignment_ptr,
    assignment_of_row_ptr,
    T,
    E,
    R,
    capacity,
    K: tl.constexpr,
    HAS_CAPACITY: tl.constexpr,
    CHUNK_T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0)
    j = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    slot = j * n_chunks + chunk
    # Assignments of each expert that come before this (slot, chunk) in priority order.
    running = tl.load(starts_ptr + slot.to(tl.int64) * E + cols, mask=col_mask, other=0)
    for start in range(0, CHUNK_T, BLOCK_T):
        t = chunk * CHUNK_T + start + tl.arange(0, BLOCK_T)
        t_mask = t < T
        e = tl.load(experts_ptr + t.to(tl.int64) * K + j, mask=t_mask, other=-1)
        valid = t_mask & (e >= 0) & (e < E)  # out-of-range ids (check=False) are left unrouted
        onehot = (e[:, None] == cols[None, :]) & valid[:, None]
        hits = onehot.to(tl.int32)
        rank = tl.cumsum(hits, axis=0)  # inclusive rank of each token among this sub-block's hits
        position = tl.sum(tl.where(onehot, running[None, :] + (rank - 1), 0), axis=1)
        running += tl.sum(hits, axis=0)
        base = tl.load(offsets_ptr + tl.where(valid, e, 0), mask=valid, other=0)
        row = base + position
        kept = valid & (row < R)
        if HAS_CAPACITY:
            kept = kept & (position < capacity)
        assignment = t.to(tl.int64) * K + j
        tl.store(row_of_assignment_ptr + assignment, tl.where(kept, row, -1), mask=t_mask)
        tl.store(assignment_of_row_ptr + tl.where(kept, row, 0), assignment, mask=kept)


def _blocks(T: int, k: int, E: int) -> Tuple[int, int, int]:
    """(BLOCK_T, CHUNK_T, num_warps): sub-blocks of about TILE_ELEMENTS one-hot entries, chunks
    long enough for about 4 * MIN_PROGRAMS programs over all slots."""
    block_e = pow2_block(E)
    block_t = pow2_block(T, hi=max(2, TILE_ELEMENTS // block_e))
    chunk_t = pow2_block(triton.cdiv(T * k, 4 * MIN_PROGRAMS), lo=block_t, hi=max(block_t, 8192))
    return block_t, chunk_t, num_warps(block_t * block_e)


def route(
    experts: torch.Tensor,
    num_experts: int,
    capacity: int,
    align: int,
    num_rows: int,
    check: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    T, k = experts.shape
    E = num_experts
    device = experts.device
    row_of_assignment = _alloc.empty((T, k), torch.int64, device)
    assignment_of_row = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    if T == 0:
        counts = torch.zeros(E, dtype=torch.int64, device=device)
        offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
        return counts, offsets, row_of_assignment, assignment_of_row, 0

    block_t, chunk_t, warps = _blocks(T, k, E)
    block_e = pow2_block(E)
    n_chunks = triton.cdiv(T, chunk_t)
    block_counts = torch.empty((k * n_chunks, E), dtype=torch.int32, device=device)
    bad = torch.empty(k * n_chunks if check else 1, dtype=torch.int32, device=device)
    grid = (n_chunks, k)
    _route_count_kernel[grid](
        experts, block_counts, bad, T, E,
        K=k, CHECK=bool(check), CHUNK_T=chunk_t, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps,
    )

    inclusive = torch.cumsum(block_counts, dim=0, dtype=torch.int64)
    starts = inclusive - block_counts
    counts = inclusive[-1].clone()
    if capacity > 0:
        counts = counts.clamp_(max=capacity)
    segment = counts if align <= 0 else (counts + (align - 1)) // align * align
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    torch.cumsum(segment, dim=0, out=offsets[1:])

    _route_assign_kernel[grid](
        experts, starts, offsets, row_of_assignment, assignment_of_row, T, E, num_rows, capacity,
        K=k, HAS_CAPACITY=capacity > 0, CHUNK_T=chunk_t, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps,
    )
    bad_ids = int(bad.sum().item()) if check else 0
    return counts, offsets, row_of_assignment, assignment_of_row, bad_ids
