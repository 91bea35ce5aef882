"""The CPU backend of pyfast.ssm: torch glue over the C++ kernels in ``pyfast._C`` (csrc/cpu/ssm).

Implements the kernel-backend contract that `ops.py` dispatches to. Inputs arrive validated and
contiguous; parameters in float32 or float64, kernels and gradients in any float dtype; outputs come from `pyfast._alloc`.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _alloc, _ext

_TAG = _ext.DTYPE_TAG


def vandermonde_fwd(W: Tensor, w: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """``K (channels, H, L)`` in ``dtype`` from ``W (channels, H, N, 2)``, ``w (H, N, 2)`` in its
    compute dtype (float32 for float16/bfloat16; see csrc/cpu/ssm/ssm.h)."""
    channels, H, N, _ = W.shape
    K = _alloc.empty((channels, H, L), dtype, W.device)
    _ext.cpu.ssm_vandermonde_fwd(_TAG[dtype], W.data_ptr(), w.data_ptr(), channels, H, N, L, K.data_ptr())
    return K


def vandermonde_bwd(grad: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """``(S0, S1)`` of shape ``(channels, H, N, 2)`` in ``w.dtype`` (grad's compute dtype) from
    ``grad (channels, H, L)``, ``w (H, N, 2)``."""
    channels, H, L = grad.shape
    N = w.shape[1]
    S0 = _alloc.empty((channels, H, N, 2), w.dtype, grad.device)
    S1 = _alloc.empty((channels, H, N, 2), w.dtype, grad.device)
    _ext.cpu.ssm_vandermonde_bwd(_TAG[grad.dtype], grad.data_ptr(), w.data_ptr(), channels, H, N, L,
                                 S0.data_ptr(), S1.data_ptr())
    return S0, S1
