"""Row movement between token order and the expert-grouped layout: gather (permute), weighted
combine (unpermute) and the gradient of the combine weights.

All row addresses are computed in int64 (T * k * d may exceed 2**31); input row strides may
differ from d (the column stride is 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc

from ._utils import TILE_ELEMENTS, compute_dtype, num_warps, pow2_block, rows_block


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    stride_x,
    assignment_of_row_ptr,
    scale_ptr,
    stride_scale,
    out_ptr,
    R,
    D,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, c): rows [i * BLOCK_R, +BLOCK_R) x columns [c * BLOCK_D, +BLOCK_D) of out."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < R
    col_mask = cols < D
    a = tl.load(assignment_of_row_ptr + rows, mask=row_mask, other=-1)
    live = row_mask & (a >= 0)
    a = tl.where(live, a, 0).to(tl.int64)
    token = a // K
    v = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=live[:, None] & col_mask[None, :], other=0.0)
    if HAS_SCALE:
        s = tl.load(scale_ptr + a * stride_scale, mask=live, other=0.0)
        v = v.to(tl.float32) * s.to(tl.float32)[:, None]
    out = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, v.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _combine_rows_kernel(
    y_ptr,
    stride_y,
    row_of_assignment_ptr,
    weights_ptr,
    stride_w,
    out_ptr,
    T,
    D,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, c): tokens [i * BLOCK_T, +BLOCK_T) x columns [c * BLOCK_D, +BLOCK_D); the k
    rows of each token are accumulated in float32 and written once."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = tokens < T
    col_mask = cols < D
    tokens64 = tokens.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(row_of_assignment_ptr + tokens64 * K + j, mask=t_mask, other=-1)
        live = t_mask & (row >= 0)
        row = tl.where(live, row, 0).to(tl.int64)
        v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=live[:, None] & col_mask[None, :], other=0.0)
        v = v.to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + tokens64 * stride_w + j, mask=live, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    out = out_ptr + tokens64[:, None] * D + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & col_mask[None, :])


@triton.jit
def _combine_weights_grad_kernel(
    grad_ptr,
    stride_grad,
    y_ptr,
    stride_y,
    row_of_assignment_ptr,
    dw_ptr,
    T,
    D,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program i: tokens [i * BLOCK_T, +BLOCK_T), looping over d in BLOCK_D chunks; every
    grad_out chunk is loaded once and dotted with the k rows of y; (BLOCK_T, k) float32 sums."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, BLOCK_K)
    t_mask = tokens < T
    tokens64 = tokens.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        g = tl.load(
            grad_ptr + tokens64[:, None] * stride_grad + cols[None, :],
            mask=t_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(row_of_assignment_ptr + tokens64 * K + j, mask=t_mask, other=-1)
            live = t_mask & (row >= 0)
            row = tl.where(live, row, 0).to(tl.int64)
            v = tl.load(
                y_ptr + row[:, None] * stride_y + cols[None, :], mask=live[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
            dot = tl.sum(g * v, axis=1)
            acc += tl.where(kcols[None, :] == j, dot[:, None], 0.0)
    out = dw_ptr + tokens64[:, None] * K + kcols[None, :]
    tl.store(out, acc, mask=t_mask[:, None] & (kcols[None, :] < K))


def _copy_blocks(n_rows: int, d: int) -> Tuple[int, int, int]:
    """(rows per program, BLOCK_D, num_warps) of a (rows, d) copy-like 2-D grid."""
    block_d = pow2_block(d, lo=16, hi=1024)
    block_r = rows_block(n_rows, max(2, TILE_ELEMENTS // block_d))
    return block_r, block_d, num_warps(block_r * block_d)


def gather_rows(
    x: torch.Tensor, assignment_of_row: torch.Tensor, k: int, scale: Optional[torch.Tensor]
) -> torch.Tensor:
    compute_dtype(x.dtype)
    d = x.shape[1]
    R = assignment_of_row.shape[0]
    out = _alloc.empty((R, d), x.dtype, x.device)
    if R == 0 or d == 0:
        return out
    block_r, block_d, warps = _copy_blocks(R, d)
    grid = (triton.cdiv(R, block_r), triton.cdiv(d, block_d))
    _gather_rows_kernel[grid](
        x,
        x.stride(0),
        assignment_of_row,
        scale if scale is not None else x,
        scale.stride(0) if scale is not None else 0,
        out,
        R,
        d,
        K=k,
        HAS_SCALE=scale is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return out


def combine_rows(y: torch.Tensor, row_of_assignment: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    compute_dtype(y.dtype)
    d = y.shape[1]
    T, k = row_of_assignment.shape
    out = _alloc.empty((T, d), y.dtype, y.device)
    if T == 0 or d == 0:
        return out
    block_t, block_d, warps = _copy_blocks(T, d)
    grid = (triton.cdiv(T, block_t), triton.cdiv(d, block_d))
    _combine_rows_kernel[grid](
        y,
        y.stride(0),
        row_of_assignment,
        weights if weights is not None else y,
        weights.stride(0) if weights is not None else 0,
        out,
        T,
        d,
        K=k,
        HAS_WEIGHTS=weights is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return out


def combine_weights_grad(grad_out: torch.Tensor, y: torch.Tensor, row_of_assignment: torch.Tensor) -> torch.Tensor:
    acc_dtype = compute_dtype(y.dtype)
    T, k = row_of_assignment.shape
    d = y.shape[1]
    if T == 0 or d == 0:
        return torch.zeros((T, k), dtype=acc_dtype, device=y.device)
    dw = _alloc.empty((T, k), acc_dtype, y.device)
    block_d = pow2_block(d, lo=16, hi=512)
    block_t = rows_block(T, max(2, (TILE_ELEMENTS // 2) // block_d))
    _combine_weights_grad_kernel[(triton.cdiv(T, block_t),)](
        grad_out,
        grad_out.stride(0),
        y,
        y.stride(0),
        row_of_assignment,
        dw,
        T,
        d,
        K=k,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_K=pow2_block(k),
        num_warps=num_warps(block_t * block_d),
    )
    return dw
