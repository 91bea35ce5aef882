"""Argument validation. Every message names the function, the argument, what was expected and
what came, e.g. ``topk_gating: logits must be 2-D (tokens, experts), got shape (4, 8, 3)``."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_value_checks = os.environ.get("PYFAST_VALUE_CHECKS", "1") != "0"


def value_checks_enabled() -> bool:
    """Checks of tensor *values* (non-finite inputs, index ranges). On a GPU they cost a device
    sync; ``PYFAST_VALUE_CHECKS=0`` or ``set_value_checks(False)`` turns them off."""
    return _value_checks


def set_value_checks(enabled: bool) -> None:
    global _value_checks
    _value_checks = bool(enabled)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    fn: str,
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    dims: str = "",
    dtypes: Optional[Iterable[torch.dtype]] = None,
) -> None:
    """Type, rank and dtype of a tensor argument; ``dims`` names the axes for the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        axes = f" {dims}" if dims else ""
        raise ValueError(f"{fn}: {name} must be {ndim}-D{axes}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{fn}: {name} must have dtype in ({_dtype_names(dtypes)}), got {value.dtype}")


def check_int(fn: str, name: str, value, *, low: Optional[int] = None, high: Optional[int] = None, what: str = "") -> int:
    """An integer argument in ``[low, high]``; ``what`` explains the bound in the message."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        extra = f" ({what})" if what else ""
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}]{extra}, got {value}")
    return value


def check_choice(fn: str, name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")
    return value


def check_same_device(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")
