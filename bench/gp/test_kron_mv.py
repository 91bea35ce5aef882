"""``(K_1 (x) ... (x) K_D) v`` on 64^3, 1024^2 and 200^3 grids, float64, one right-hand side.

Bytes moved (the memory floor): one read and one write of ``v`` per mode, ``2 D N s`` (factors
are small). The dense reference (``kron(K) @ v``) would need N^2 entries (0.5 TB at 64^3), so
the providers are:
  pyfast        pyfast.gp.kron_mv (mode products on GEMM views, no permute copies)
  torch-native  leading-mode GEMM + transpose copy per mode (the usual plain-torch code)
  gpytorch      linear_operator KroneckerProductLinearOperator @ v
"""
import pytest
import torch

import pyfast
from grids import GRIDS, gpytorch_kron_mv, need_gpytorch, setup, torch_kron_mv

SUITE = "gp kron_mv: (K_1 x ... x K_D) v, float64"
PROVIDERS = {"pyfast": pyfast.gp.kron_mv, "torch-native": torch_kron_mv, "gpytorch": gpytorch_kron_mv}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("sizes", GRIDS)
def test_kron_mv(measure, expect_close, device, sizes, provider):
    need_gpytorch(provider)
    factors, v = setup(sizes, device)
    ref = torch_kron_mv(factors, v)
    fn = PROVIDERS[provider]
    measure(
        lambda: fn(factors, v),
        suite=SUITE,
        workload="x".join(map(str, sizes)),
        provider=provider,
        bytes_moved=2 * len(sizes) * v.numel() * 8,
        sizes={"grid": list(sizes), "B": 1, "dtype": "float64"},
        check=expect_close(ref, 1e-10, f"{provider} kron_mv"),
    )
