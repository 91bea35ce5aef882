"""Imports the compiled modules and says why one is missing.

`cpu` / `cuda` are the modules `pyfast._C` / `pyfast._cuda` or None; `cpu_error` / `cuda_error`
hold the reason when None. Triton is looked up lazily (importing it costs ~1 s).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional, Tuple

import torch


def _load(name: str):
    try:
        return importlib.import_module(f"pyfast.{name}"), None
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"


cpu, cpu_error = _load("_C")
cuda, cuda_error = _load("_cuda")
if cuda is None and cuda_error and "No module named" in cuda_error:
    cuda_error = "not built (no CUDA toolkit at build time, or PYFAST_CUDA=OFF)"

# Dtype tags shared with csrc/common/dtype.h.
DTYPE_TAG = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
}


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_status: Optional[Tuple[bool, Optional[str]]] = None


def triton_status() -> Tuple[bool, Optional[str]]:
    """(usable, reason when not): Triton imports and can launch (a CUDA device or the interpreter)."""
    global _triton_status
    if _triton_status is None:
        _triton_status = _probe_triton()
    return _triton_status


def _probe_triton() -> Tuple[bool, Optional[str]]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'pyfast-kernels[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install raises more than ImportError
        return False, f"import triton failed: {type(err).__name__}: {err}"
    if not (torch.cuda.is_available() or triton_interpret()):
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    return True, None
