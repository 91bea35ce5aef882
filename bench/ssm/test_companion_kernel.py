"""SpaceTime companion-matrix kernel K (H, L) from a, b, c (H, d), forward.

Workloads: H = 96 (768 ``large``), d = 64, L = 4096, float32. Bytes moved: the output write
``H L 4`` plus the parameters ``3 H d 4``.

Providers:
  pyfast        pyfast.ssm.companion_kernel (transfer function at the L-th roots of unity + FFT)
  reference     pyfast.ssm.reference.companion_kernel_matrix_power: L batched matrix-vector products
"""
import functools

import pytest
import torch

import pyfast
from pyfast.ssm import reference

SUITE = "ssm companion_kernel: SpaceTime companion kernel"
D_STATE, L = 64, 4096


@functools.lru_cache(maxsize=1)
def setup(H, device):
    """Seeded ``(a, b, c)`` with a scaled so that the companion matrices are stable."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(H, D_STATE, generator=gen) * 0.5 / D_STATE
    b, c = torch.randn(H, D_STATE, generator=gen), torch.randn(H, D_STATE, generator=gen)
    return a.to(device), b.to(device), c.to(device)


PROVIDERS = {"pyfast": pyfast.ssm.companion_kernel, "reference": reference.companion_kernel_matrix_power}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("H", [96, pytest.param(768, marks=pytest.mark.large)])
def test_companion_kernel_forward(measure, expect_close, device, H, provider):
    a, b, c = setup(H, device)
    ref = pyfast.ssm.companion_kernel(a.double(), b.double(), c.double(), L)
    fn = PROVIDERS[provider]
    measure(lambda: fn(a, b, c, L), suite=SUITE, workload=f"H={H} d={D_STATE} L={L}", provider=provider,
            bytes_moved=H * L * 4 + 3 * H * D_STATE * 4, sizes={"H": H, "d": D_STATE, "L": L, "dtype": "float32"},
            check=expect_close(ref, 1e-4, f"{provider} companion_kernel"))
