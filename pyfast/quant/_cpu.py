"""The CPU backend of pyfast.quant: torch glue over the C++ kernels in ``pyfast._C`` (csrc/cpu/quant).

Inputs arrive validated (ops.py): x ``(M, K)`` float32/float16/bfloat16 with unit stride along K,
codes ``(N, row_bytes)`` uint8, scales ``(N, groups)`` float32, table ``(2**bits,)`` float32 or
``(E, 2**bits)`` with table_index ``(N, groups)`` uint8 (per-group exponents), all contiguous, group
size a multiple of 8.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _alloc, _ext

_TAG = _ext.DTYPE_TAG
# Above this many rows of x, W is decoded once to float32 and torch's blocked GEMM runs: the decode
# kernel re-decodes W for every 8 rows and has no cache blocking, which pays only for few rows.
MAX_DECODE_ROWS = 16


def _weight_args(codes: Tensor, scales: Tensor, table: Tensor, table_index: Optional[Tensor], bits: int, group_size: int, K: int):
    index, tables = (0, 1) if table_index is None else (table_index.data_ptr(), table.shape[0])
    return (codes.data_ptr(), codes.shape[0], K, codes.shape[1], scales.data_ptr(), group_size, table.data_ptr(), bits,
            index, tables)


def dequantize(codes: Tensor, scales: Tensor, table: Tensor, table_index: Optional[Tensor], bits: int, group_size: int,
               K: int, dtype: torch.dtype) -> Tensor:
    """``(N, K)`` W in ``dtype`` (float32/float16/bfloat16)."""
    out = _alloc.empty((codes.shape[0], K), dtype, codes.device)
    _ext.cpu.quant_dequantize(_TAG[dtype], *_weight_args(codes, scales, table, table_index, bits, group_size, K), out.data_ptr())
    return out


def power_linear_fwd(x: Tensor, codes: Tensor, scales: Tensor, table: Tensor, table_index: Optional[Tensor], bits: int,
                     group_size: int) -> Tensor:
    """``(M, N)`` ``x W^T`` in x.dtype."""
    M, K = x.shape
    N = codes.shape[0]
    if M > MAX_DECODE_ROWS:
        w = dequantize(codes, scales, table, table_index, bits, group_size, K, torch.float32)
        return torch.nn.functional.linear(x.float(), w).to(x.dtype)
    y = _alloc.empty((M, N), x.dtype, x.device)
    _ext.cpu.quant_power_linear_fwd(
        _TAG[x.dtype], x.data_ptr(), M, x.stride(0), *_weight_args(codes, scales, table, table_index, bits, group_size, K),
        y.data_ptr(), y.stride(0),
    )
    return y
