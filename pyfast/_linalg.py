"""Threading of small CPU eigendecompositions, shared by the families that factor small matrices
(gp grid factors, influence covariance factors)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

# Below this order a CPU eigendecomposition is too small to share between threads: they add only
# synchronization, which on a busy machine costs 10-1000x the work (2-core CPU at load average
# 4-5: a 64 x 64 float64 eigh took 0.35 ms on one thread and 78-116 ms on two).
THREADED_EIGH_MIN = 1024


@contextlib.contextmanager
def eigh_threads(*matrices: Tensor) -> Iterator[None]:
    """Runs the block on one CPU thread when every matrix is a CPU matrix of order below
    `THREADED_EIGH_MIN`; otherwise leaves torch's thread count alone."""
    small = all(M.device.type == "cpu" and M.shape[-1] < THREADED_EIGH_MIN for M in matrices)
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)
