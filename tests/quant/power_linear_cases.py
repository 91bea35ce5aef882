"""Shared check of the power_linear kernels against the float64 reference."""
import torch

import pyfast
from kernel_cases import assert_close
from pyfast.quant import reference


def check_power_linear(kernel, q, rows, label: str) -> None:
    """``power_linear(x, q)`` on ``kernel``'s backend for every ``M`` in ``rows`` and every kernel
    dtype but float64 (which runs the reference), against the float64 reference."""
    N, K = q.shape
    for dtype in kernel.dtypes:
        if dtype == torch.float64:
            continue
        for M in rows:
            x = torch.randn(M, K, device=kernel.device).to(dtype)
            with pyfast.use_backend(kernel.backend):
                y = pyfast.quant.power_linear(x, q)
            assert y.dtype == dtype and y.shape == (M, N)
            assert_close(y, reference.power_linear(x.double(), q), dtype, f"M={M} {dtype} {label}")
