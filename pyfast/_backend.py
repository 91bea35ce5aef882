"""Which implementation runs an op: ``auto | triton | cuda | cpu | reference``.

Set with the ``PYFAST_BACKEND`` environment variable or the `use_backend` context manager.
``auto`` picks, per call, the compiled kernel for the tensor's device and dtype (CUDA tensor ->
the op's preferred GPU backend, CPU tensor -> ``pyfast._C``) and falls back to the pure-torch
reference for anything no kernel covers. Naming a backend forces it; if it cannot run the call,
the op raises and says why. `backend_for` tells which path an op would take, and why.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")


def _from_env() -> str:
    name = os.environ.get("PYFAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"PYFAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


# A process-wide setting (a plain global, so torch.compile guards on it instead of breaking the graph).
_requested: Optional[str] = None


def get_backend() -> str:
    """The requested backend (``auto`` unless set)."""
    return _requested or _from_env()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on ``name`` (one of `BACKENDS`). Process-wide, not per thread."""
    global _requested
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = _requested
    _requested = name
    try:
        yield
    finally:
        _requested = previous


@dataclass(frozen=True)
class OpKernels:
    """The dtypes each compiled backend of one op covers; ``gpu_preference`` lists GPU backends in
    the order their benchmarks ranked them."""

    name: str
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = field(default_factory=dict)
    gpu_preference: Tuple[str, ...] = ("triton", "cuda")
    # What the ``cpu`` backend runs when it is pyfast's own torch code rather than a pyfast._C kernel
    # (no compiled kernel beat torch there); None for a pyfast._C kernel.
    cpu_path: Optional[str] = None


_OPS: Dict[str, OpKernels] = {}


def register_op(name: str, *, cpu_path: Optional[str] = None, **dtypes: Tuple[torch.dtype, ...]) -> OpKernels:
    """Declare op ``name`` (e.g. ``"moe.topk_gating"``) and the dtypes each kernel backend covers.

    ``cpu_path`` describes the ``cpu`` backend when it is torch code (e.g. ``"torch GEMMs on mode
    views"``) instead of a pyfast._C kernel; `backend_for` then says so.
    """
    unknown = set(dtypes) - set(KERNEL_BACKENDS)
    if unknown:
        raise ValueError(f"register_op: unknown backends {sorted(unknown)} for {name}")
    if cpu_path is not None and "cpu" not in dtypes:
        raise ValueError(f"register_op: cpu_path given for {name} without cpu dtypes")
    kernels = OpKernels(name, dict(dtypes), cpu_path=cpu_path)
    _OPS[name] = kernels
    return kernels


def registered_ops() -> Dict[str, OpKernels]:
    return dict(_OPS)


class Choice(NamedTuple):
    backend: str
    reason: str


def _unavailable(op: OpKernels, backend: str, tensor: torch.Tensor) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``tensor``, or None when it can."""
    if backend == "reference":
        return None
    covered = op.dtypes.get(backend)
    if covered is None:
        return f"{op.name} has no {backend} kernel"
    if tensor.dtype not in covered:
        return f"the {backend} kernel of {op.name} does not cover {tensor.dtype}"
    if backend == "cpu":
        if tensor.device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got a {tensor.device.type} tensor"
        if op.cpu_path is not None:
            return None
        return None if _ext.cpu is not None else f"pyfast._C is unavailable: {_ext.cpu_error}"
    if backend == "cuda":
        if tensor.device.type != "cuda":
            return f"pyfast._cuda runs CUDA tensors, got a {tensor.device.type} tensor"
        return None if _ext.cuda is not None else f"pyfast._cuda is unavailable: {_ext.cuda_error}"
    # triton
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and _ext.triton_interpret()):
        return f"Triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {tensor.device.type} tensor"
    ok, why = _ext.triton_status()
    return None if ok else why


def backend_for(op: str, tensor: torch.Tensor) -> Choice:
    """Which backend runs ``op`` for ``tensor`` (its device and dtype) under the current setting."""
    if op not in _OPS:
        raise KeyError(f"backend_for: unknown op {op!r}; known: {sorted(_OPS)}")
    kernels = _OPS[op]
    requested = get_backend()
    if requested != "auto":
        why = _unavailable(kernels, requested, tensor)
        if why is not None:
            raise RuntimeError(f"{op}: backend {requested!r} was requested but cannot run: {why}")
        return Choice(requested, "requested")
    if tensor.device.type == "cuda":
        candidates: Tuple[str, ...] = kernels.gpu_preference
    elif tensor.device.type == "cpu":
        candidates = ("cpu",)
    else:
        candidates = ()
    reasons = []
    for backend in candidates:
        why = _unavailable(kernels, backend, tensor)
        if why is None:
            what = f"{backend} kernel" if backend != "cpu" or kernels.cpu_path is None else kernels.cpu_path
            return Choice(backend, f"{what} for {tensor.dtype} on {tensor.device.type}")
        reasons.append(why)
    return Choice("reference", "; ".join(reasons) or f"no kernel for {tensor.device.type} tensors")
