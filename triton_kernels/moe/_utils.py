"""Launch helpers shared by the MoE Triton kernels: block sizes, warp counts, dtypes."""
from __future__ import annotations

import torch
import triton

# Aim for at least this many programs (about two per SM on an H100's 132 SMs) before making
# row blocks larger, so small batches still spread over the whole GPU.
MIN_PROGRAMS = 264
# Programs of the looping reductions (loss partial sums). Fixed, not taken from the device, so the
# reduction order, and with it the result, is the same on every GPU.
REDUCE_PROGRAMS = 1024
# Elements of one (rows x columns) register tile.
TILE_ELEMENTS = 4096

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pow2_block(n: int, lo: int = 2, hi: int = 1 << 30) -> int:
    """The power of two covering ``n``, clamped to ``[lo, hi]`` (``lo``, ``hi`` powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def rows_block(n_rows: int, cap: int, lo: int = 2) -> int:
    """Rows per program: the largest power of two <= ``cap`` that still leaves about
    `MIN_PROGRAMS` programs for ``n_rows`` rows, and at least ``lo``."""
    want = max(1, int(n_rows) // MIN_PROGRAMS)
    block = 1 << (want.bit_length() - 1)  # largest power of two <= want
    return max(lo, min(cap, block))


def num_warps(tile_elements: int) -> int:
    """Warps for a program whose largest live tile has ``tile_elements`` elements."""
    if tile_elements <= 512:
        return 1
    if tile_elements <= 1024:
        return 2
    if tile_elements <= 2048:
        return 4
    return 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the Triton kernels: float32 (float64 inputs go to other backends)."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyfast.triton_kernels.moe: unsupported dtype {dtype}; expected one of {_FLOAT_DTYPES}")
    return torch.float32
