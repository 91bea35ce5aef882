"""Grouped expert GEMMs over the expert-grouped layout of `Routing`, with the MoE fusions:

- the gather of token rows fused into the A load (row r reads ``x[assignment_of_row[r] // k]``,
  no permuted copy of x);
- the activation fused into the epilogue of the first GEMM (gated: the gate and up columns of one
  tile are two accumulators of the same K loop);
- the gate-weighted scatter fused into the epilogue of the second GEMM (row r is multiplied by its
  gate weight and stored at its assignment ``t * k + j``; a sum over k finishes the combine);
- for the backward, the activation gradient and the gate-weight gradient fused into the epilogue of
  the output-gradient GEMM.

Tiles: expert e's rows ``offsets[e] : offsets[e] + counts[e]`` are cut into BLOCK_M row tiles; the
tile list is computed on the device (`tile_schedule`), so no row count reaches the host and no
padding is needed (ScatterMoE style). All row addresses are int64.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

# Activation codes shared by the kernels (pyfast/moe/activations.py is the spec).
ACT_CODES = {"silu": 1, "gelu": 2, "relu": 3}


class TileSchedule(NamedTuple):
    """Per tile: expert (-1 past the last tile), first row, end row of the expert's segment."""

    expert: torch.Tensor
    row_start: torch.Tensor
    row_end: torch.Tensor


def tile_schedule(counts: torch.Tensor, offsets: torch.Tensor, rows: int, block_m: int) -> TileSchedule:
    """Cut every expert's segment into ``block_m`` row tiles; a static number of tiles
    (``cdiv(rows, block_m) + E``, a bound for any routing of ``rows`` rows)."""
    num_experts = counts.shape[0]
    max_tiles = triton.cdiv(rows, block_m) + num_experts
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    index = torch.arange(max_tiles, device=counts.device)
    expert = torch.searchsorted(ends, index, right=True)
    e = expert.clamp(max=num_experts - 1)
    row_start = offsets[e] + (index - (ends[e] - tiles[e])) * block_m
    row_end = offsets[e] + counts[e]
    expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    return TileSchedule(expert, row_start, row_end)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """Derivative of `_act` at z."""
    if ACT == 1:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        return tl.where(z > 0, 1.0, 0.0)


@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M: tl.constexpr):
    """(expert, rows (BLOCK_M,) int64, row mask) of this program's tile."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M).to(tl.int64)
    return expert, rows, rows < tl.load(tile_end_ptr + tile)


@triton.jit
def _source_rows(rows, row_mask, assignment_ptr, TOP_K: tl.constexpr, GATHER: tl.constexpr):
    """Rows of the A operand: the token of each grouped row when gathering, else the row itself."""
    if GATHER:
        a = tl.load(assignment_ptr + rows, mask=row_mask, other=0)
        return (a // TOP_K).to(tl.int64)
    return rows


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_am,
    b_ptr, stride_be, stride_bk, stride_bn,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    assignment_ptr, gate_ptr,
    out_ptr, stride_om,
    hidden_ptr, stride_hm,
    N, K, N_HALF,
    TOP_K: tl.constexpr,
    GATHER: tl.constexpr,  # A row r is a[assignment_of_row[r] // TOP_K]
    ACT: tl.constexpr,  # 0: none; else store act(acc) to out and acc to hidden
    GATED: tl.constexpr,  # B columns n and n + N_HALF are gate and up: out = act(gate) * up
    SCATTER: tl.constexpr,  # store row r at assignment_of_row[r] (times the gate weight when HAS_GATE)
    HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (tile, c): rows of one tile x output columns [c * BLOCK_N, +BLOCK_N).
    out[r, n] = sum_k a[src(r), k] * b[e, k, n] (b addressed through its strides)."""
    expert, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if expert < 0:
        return
    src = _source_rows(rows, row_mask, assignment_ptr, TOP_K, GATHER)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols + N_HALF)[None, :] * stride_bn, mask=b_mask, other=0.0)
            acc_up += tl.dot(a, b_up, input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    if ACT != 0:
        hidden = hidden_ptr + rows[:, None] * stride_hm + cols[None, :]
        tl.store(hidden, acc.to(hidden_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(hidden + N_HALF, acc_up.to(hidden_ptr.dtype.element_ty), mask=mask)
            acc = _act(acc, ACT) * acc_up
        else:
            acc = _act(acc, ACT)
    dst = rows
    if SCATTER:
        dst = tl.load(assignment_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        if HAS_GATE:
            acc = acc * tl.load(gate_ptr + dst, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + dst[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_gemm_kernel(
    g_ptr, stride_gm,
    w2_ptr, stride_we, stride_wk, stride_wn,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    assignment_ptr, gate_ptr,
    hidden_ptr, stride_hm,
    dh_ptr, stride_dhm,
    a_scaled_ptr, stride_asm,
    dgate_ptr, stride_dgm,
    F, D,
    TOP_K: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward through the second GEMM and the activation, program (tile, c) over ffn columns:
    da = g[token(r)] @ w2[e] (unweighted); with w the gate weight of row r and a = act(h):
    dgate partial (column block c) = sum_n da * a; a_scaled = w * a; dh = act'(h) (w * da)."""
    expert, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if expert < 0:
        return
    assignment = tl.load(assignment_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    src = assignment // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    da = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        g = tl.load(g_ptr + src[:, None] * stride_gm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        da += tl.dot(g, w, input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    gate = tl.load(gate_ptr + assignment, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    h_ptrs = hidden_ptr + rows[:, None] * stride_hm + cols[None, :]
    dh_ptrs = dh_ptr + rows[:, None] * stride_dhm + cols[None, :]
    z = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        act = _act(z, ACT)
        a = act * up
        tl.store(dh_ptrs, (gate * da * up * _act_grad(z, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs + F, (gate * da * act).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        a = _act(z, ACT)
        tl.store(dh_ptrs, (gate * da * _act_grad(z, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(a_scaled_ptr + rows[:, None] * stride_asm + cols[None, :], (gate * a).to(a_scaled_ptr.dtype.element_ty), mask=mask)
    partial = tl.sum(tl.where(mask, da * a, 0.0), axis=1)
    tl.store(dgate_ptr + rows * stride_dgm + tl.program_id(1), partial, mask=row_mask)


@triton.jit
def _grouped_wgrad_kernel(
    l_ptr, stride_lm,
    r_ptr, stride_rm,
    counts_ptr, offsets_ptr, assignment_ptr,
    dw_ptr, stride_de, stride_di, stride_dj,
    I, J,
    TOP_K: tl.constexpr,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program (e, c): dw[e, i, j] = sum over expert e's rows r of l[src(r), i] * r[src(r), j] for
    one (BLOCK_I, BLOCK_J) tile; zero for an empty expert."""
    expert = tl.program_id(0)
    tiles_j = tl.cdiv(J, BLOCK_J)
    i_cols = (tl.program_id(1) // tiles_j) * BLOCK_I + tl.arange(0, BLOCK_I)
    j_cols = (tl.program_id(1) % tiles_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i_cols < I
    j_mask = j_cols < J
    start = tl.load(offsets_ptr + expert)
    end = start + tl.load(counts_ptr + expert)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < end
        l_rows = _source_rows(rows, row_mask, assignment_ptr, TOP_K, GATHER_L)
        r_rows = _source_rows(rows, row_mask, assignment_ptr, TOP_K, GATHER_R)
        lt = tl.load(l_ptr + l_rows[None, :] * stride_lm + i_cols[:, None], mask=i_mask[:, None] & row_mask[None, :], other=0.0)
        rt = tl.load(r_ptr + r_rows[:, None] * stride_rm + j_cols[None, :], mask=row_mask[:, None] & j_mask[None, :], other=0.0)
        acc += tl.dot(lt, rt, input_precision=PRECISION)
    out = dw_ptr + expert.to(tl.int64) * stride_de + i_cols[:, None] * stride_di + j_cols[None, :] * stride_dj
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])
