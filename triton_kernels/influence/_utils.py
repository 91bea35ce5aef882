"""Launch helpers shared by the influence Triton kernels."""
from __future__ import annotations

import triton

# Aim for about this many programs (two per SM on an H100) before splitting a reduction further.
MIN_PROGRAMS = 264


def dot_block(n: int, hi: int = 64) -> int:
    """Power-of-two tile edge for a ``tl.dot`` operand: covers ``n``, within ``[16, hi]``."""
    return max(16, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(exact: bool) -> str:
    """``ieee`` float32 products for float32 data; data from half inputs already carries ~1e-3
    relative error, so tensor-core tf32 products cost it nothing."""
    return "ieee" if exact else "tf32"
