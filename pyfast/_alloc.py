"""Output allocation for the kernel glue.

With ``PYFAST_POISON=1`` (the test suite sets it) outputs start as NaN (floats) or a negative
sentinel (integers) instead of uninitialized memory, so an element a kernel forgets to write
fails the comparison with the reference instead of passing by luck.
"""
import os
from typing import Sequence, Union

import torch

INT_POISON = -7_777_777


def empty(shape: Sequence[int], dtype: torch.dtype, device: Union[str, torch.device]) -> torch.Tensor:
    if os.environ.get("PYFAST_POISON") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else INT_POISON
    return torch.full(shape, fill, dtype=dtype, device=device)
