"""Masked uncentered covariance ``sum_t m_t x_t x_t^T`` of ``x (N, d)``.

Grid: (d / BLOCK_D) x (d / BLOCK_D) output tiles x SPLIT row ranges. Each program accumulates
``x_i^T (m * x_j)`` over its rows in float32 with tl.dot and writes a partial ``(d, d)`` tile;
a torch sum over the SPLIT partials finishes (fixed split count: deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _alloc
from ._utils import MIN_PROGRAMS, dot_block, dot_precision


@triton.jit
def _covariance_fwd_kernel(
    x_ptr,
    stride_x,
    mask_ptr,
    partial_ptr,
    N,
    D,
    ROWS_PER_SPLIT,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.program_id(2)
    ci = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, N)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < end
        offsets = rows.to(tl.int64)[:, None] * stride_x
        xi = tl.load(x_ptr + offsets + ci[None, :], mask=row_ok[:, None] & (ci[None, :] < D), other=0.0)
        xj = tl.load(x_ptr + offsets + cj[None, :], mask=row_ok[:, None] & (cj[None, :] < D), other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
            xj = xj * m[:, None].to(xj.dtype)  # m is 0 or 1: exact in any dtype
        acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION)
    out = partial_ptr + split.to(tl.int64) * D * D + ci[:, None] * D + cj[None, :]
    tl.store(out, acc, mask=(ci[:, None] < D) & (cj[None, :] < D))


def covariance_sum(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x (N, d)`` with unit last stride, ``mask (N,) float32`` or None -> ``(d, d) float32``."""
    N, D = x.shape
    block_d = dot_block(D)
    block_n = 32
    tiles = triton.cdiv(D, block_d) ** 2
    split = max(1, min(triton.cdiv(N, block_n), MIN_PROGRAMS // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(N, split), block_n) * block_n
    split = max(1, triton.cdiv(N, rows_per_split))
    partial = _alloc.empty((split, D, D), torch.float32, x.device)
    if D == 0:
        return partial.sum(dim=0)
    _covariance_fwd_kernel[(triton.cdiv(D, block_d), triton.cdiv(D, block_d), split)](
        x,
        x.stride(0),
        mask if mask is not None else x,
        partial,
        N,
        D,
        rows_per_split,
        HAS_MASK=mask is not None,
        PRECISION=dot_precision(x.dtype == torch.float32),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return partial.sum(dim=0)
