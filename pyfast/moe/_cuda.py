"""The CUDA C++ backend of pyfast.moe: torch glue over ``pyfast._cuda`` (csrc/cuda/moe/).

Implements the kernel-backend contract functions that have a CUDA C++ kernel (see
pyfast/moe/ops.py and the ``cuda=`` entries of its ``register_op`` calls). Each function allocates
the outputs, passes raw pointers and the current stream of the tensors' device, and never
synchronizes unless a host-side value is asked for (``check``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _alloc, _ext


def _module():
    if _ext.cuda is None:
        raise RuntimeError(f"pyfast._cuda is unavailable: {_ext.cuda_error}")
    return _ext.cuda


def route(
    experts: torch.Tensor,
    num_experts: int,
    capacity: int,
    align: int,
    num_rows: int,
    check: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(counts (E,), offsets (E+1,), row_of_assignment (T, k), assignment_of_row (R,), bad_ids)``,
    all int64, exactly `pyfast.moe.reference.route`. ``experts``: contiguous (T, k) int32 CUDA tensor.
    ``bad_ids`` counts ids outside ``[0, E)`` when ``check`` (reading it synchronizes), else 0."""
    ext = _module()
    tokens, k = experts.shape
    device = experts.device
    if experts.dtype != torch.int32 or not experts.is_contiguous():
        experts = experts.to(torch.int32).contiguous()
    counts = _alloc.empty((num_experts,), torch.int64, device)
    offsets = _alloc.empty((num_experts + 1,), torch.int64, device)
    row_of_assignment = _alloc.empty((tokens, k), torch.int64, device)
    assignment_of_row = _alloc.empty((num_rows,), torch.int64, device)
    bad = torch.empty((1,), dtype=torch.int32, device=device)
    workspace = torch.empty((ext.moe_route_workspace(tokens, k, num_experts),), dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        ext.moe_route(
            experts.data_ptr(), tokens, k, num_experts, capacity, align, num_rows,
            counts.data_ptr(), offsets.data_ptr(), row_of_assignment.data_ptr(), assignment_of_row.data_ptr(),
            bad.data_ptr(), workspace.data_ptr(), torch.cuda.current_stream(device).cuda_stream,
        )
    return counts, offsets, row_of_assignment, assignment_of_row, int(bad.item()) if check else 0


__all__ = ["route"]
