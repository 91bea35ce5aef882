"""Mode product on a row-major grid vector: a strided batched GEMM ``out[z] = P[z] @ Q[z]``.

A mode-``d`` product of ``M (m, n)`` with ``x`` viewed as ``(A, n, C)`` is ``out[a] = M @ x[a]``
(``P`` = ``M`` broadcast with batch stride 0). When ``C = 1`` (last mode, one right-hand side) the
tiles would be 1 column wide, so it runs as the single GEMM ``x (A, n) @ M^T`` instead. Products
accumulate in float32 (``tl.dot``); the output is written in the input dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ... import _alloc


@triton.jit
def _mode_product_fwd_kernel(
    p_ptr, q_ptr, out_ptr,
    M, N, K,
    stride_pz, stride_pm, stride_pk,
    stride_qz, stride_qk, stride_qn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (z, i, j): the ``(BLOCK_M, BLOCK_N)`` tile (i, j) of ``out[z] = P[z] @ Q[z]``
    (``out`` contiguous ``(Z, M, N)``)."""
    z = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_base = p_ptr + z * stride_pz
    q_base = q_ptr + z * stride_qz
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        p = tl.load(p_base + rows[:, None] * stride_pm + kk[None, :] * stride_pk,
                    mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = tl.load(q_base + kk[:, None] * stride_qk + cols[None, :] * stride_qn,
                    mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision="ieee")
    out = out_ptr + z * M * N + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _batched_gemm(p: torch.Tensor, q: torch.Tensor, pz: int, qz: int, batch: int, out: torch.Tensor) -> None:
    """``out (batch, M, N) = P[z] @ Q[z]`` for ``p (M, K)``/``q (K, N)`` strided views whose batch
    strides are ``pz`` / ``qz`` elements."""
    m, k = p.shape
    n = q.shape[1]
    bm, bn, bk = _block(m, 64), _block(n, 64), _block(k, 32)
    grid = (batch, triton.cdiv(m, bm), triton.cdiv(n, bn))
    _mode_product_fwd_kernel[grid](
        p, q, out, m, n, k,
        pz, p.stride(0), p.stride(1),
        qz, q.stride(0), q.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def apply_mode(
    matrix: torch.Tensor, x: torch.Tensor, grid: Sequence[int], mode: int, cols: int, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``matrix (m, n_mode)`` along ``mode`` of ``x (N, cols)`` (contiguous, row-major grid ``grid``);
    returns ``(N / n_mode * m, cols)`` contiguous, in the flat buffer ``out`` when given (same
    contract as `pyfast.gp._modes.apply_mode`)."""
    a = math.prod(grid[:mode])
    n = grid[mode]
    c = math.prod(grid[mode + 1:]) * cols
    m = matrix.shape[0]
    shape = (a * m * math.prod(grid[mode + 1:]), cols)
    out = _alloc.empty(shape, x.dtype, x.device) if out is None else out[: math.prod(shape)].view(shape)
    if out.numel() == 0:
        return out
    if n == 0:
        return out.zero_()
    if c == 1:  # out (A, m) = x (A, n) @ M^T
        _batched_gemm(x.view(a, n), matrix.t(), 0, 0, 1, out.view(1, a, m))
    else:  # out[a] (m, C) = M @ x[a] (n, C)
        _batched_gemm(matrix, x.view(a, n, c)[0], 0, n * c, a, out.view(a, m, c))
    return out
