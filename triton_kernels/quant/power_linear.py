"""y = x W^T with W decoded from packed power-grid codes inside the kernel, and W's dequantization.

Layout (pyfast/quant/reference.py): codes ``(N, row_bytes)`` uint8, code k of a row in bits
``[BITS*k, BITS*k + BITS)`` of the row's little-endian bit stream; ``W[n, k] = scales[n, k // GROUP]
* table[e, code]``, table the ``(E, 2**BITS)`` float32 levels of each exponent, ``e = index[n, k //
GROUP]`` with per-group exponents (PER_GROUP) and 0 otherwise. Decoding reads the code's byte (and
for 3 bits the next one), shifts, masks and gathers the level from the table (L1-resident).

Kernels: a decode GEMV for few rows of x (one program per row of x and block of output columns,
reduction over K in registers) and a tiled GEMM (tl.dot on decoded W tiles) for more rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _alloc

GEMV_MAX_ROWS = 4  # rows of x up to which each row gets its own GEMV program


@triton.jit
def _decode_tile(codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, n, k, mask,
                 BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr):
    """(len(n), len(k)) float32 tile of W at rows n and columns k (zeros outside ``mask``)."""
    row = codes_ptr + n.to(tl.int64)[:, None] * row_bytes
    bit = k[None, :] * BITS
    byte = bit >> 3
    word = tl.load(row + byte, mask=mask, other=0).to(tl.int32)
    if BITS == 3:  # a 3-bit code may continue in the next byte
        spill = ((bit & 7) + BITS > 8) & mask
        word = word | (tl.load(row + byte + 1, mask=spill, other=0).to(tl.int32) << 8)
    code = (word >> (bit & 7)) & ((1 << BITS) - 1)
    group = n.to(tl.int64)[:, None] * groups + k[None, :] // GROUP
    if PER_GROUP:
        code += tl.load(index_ptr + group, mask=mask, other=0).to(tl.int32) << BITS
    level = tl.load(table_ptr + code, mask=mask, other=0.0)
    scale = tl.load(scales_ptr + group, mask=mask, other=0.0)
    return level * scale


@triton.jit
def _power_linear_gemv_kernel(
    x_ptr, stride_x, codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, y_ptr, stride_y, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (c, m): y[m, c * BLOCK_N + (0..BLOCK_N)]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1).to(tl.int64)
    n_mask = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        w = _decode_tile(codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, n, k,
                         n_mask[:, None] & k_mask[None, :], BITS, GROUP, PER_GROUP)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + m * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _power_linear_gemm_kernel(
    x_ptr, stride_x, codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, y_ptr, stride_y, M, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (i, c): the (BLOCK_M, BLOCK_N) tile of y at rows i * BLOCK_M, columns c * BLOCK_N.
    W tiles are decoded to x's dtype and multiplied with float32 accumulation."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _decode_tile(codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, n, k,
                         n_mask[:, None] & k_mask[None, :], BITS, GROUP, PER_GROUP)
        if IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out = y_ptr + m.to(tl.int64)[:, None] * stride_y + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(
    codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, out_ptr, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    w = _decode_tile(codes_ptr, row_bytes, scales_ptr, groups, table_ptr, index_ptr, n, k, mask, BITS, GROUP, PER_GROUP)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _weight(codes, scales, table, table_index):
    """Kernel arguments of the weight and the PER_GROUP flag (without an index, the codes stand in
    for the unused index pointer)."""
    per_group = table_index is not None
    return (codes, codes.shape[1], scales, scales.shape[1], table, table_index if per_group else codes), per_group


def power_linear_fwd(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                     table_index: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """``(M, N)`` ``x W^T`` in x.dtype; x ``(M, K)`` with unit stride along K."""
    M, K = x.shape
    N = codes.shape[0]
    y = _alloc.empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y
    common, per_group = _weight(codes, scales, table, table_index)
    if M <= GEMV_MAX_ROWS:
        block_n, block_k = 32, 128
        grid = (triton.cdiv(N, block_n), M)
        _power_linear_gemv_kernel[grid](x, x.stride(0), *common, y, y.stride(0), N, K,
                                        BITS=bits, GROUP=group_size, PER_GROUP=per_group, BLOCK_N=block_n, BLOCK_K=block_k,
                                        num_warps=4)
    else:
        block_m = 16 if M <= 16 else 64
        block_n, block_k = 64, 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _power_linear_gemm_kernel[grid](x, x.stride(0), *common, y, y.stride(0), M, N, K,
                                        BITS=bits, GROUP=group_size, PER_GROUP=per_group, IEEE=x.dtype == torch.float32,
                                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y


def dequantize(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, table_index: Optional[torch.Tensor],
               bits: int, group_size: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, K)`` W in ``dtype``."""
    N = codes.shape[0]
    out = _alloc.empty((N, K), dtype, codes.device)
    if N and K:
        block_n, block_k = 16, 128
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
        common, per_group = _weight(codes, scales, table, table_index)
        _dequantize_kernel[grid](*common, out, N, K, BITS=bits, GROUP=group_size, PER_GROUP=per_group,
                                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
