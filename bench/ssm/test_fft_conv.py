"""FFT long convolution y = u * k + D u, u (B, H, L) bfloat16, k (H, L) float32, forward (and forward +
backward at two sizes).

Workloads: the issue's (B, H, L) = (64, 768, 1024), (64, 768, 4096) (``large``), (16, 768, 16384)
and (8, 768, 65536) (GPU only: ``large`` and skipped on the CPU), and for ``--quick`` (8, 768, 1024),
(2, 768, 4096) and (2, 768, 4097) (a length that is not a power of two). Bytes moved (the floor):
read u and write y (``2 B H L s``), read k (``H L 4``).

Providers:
  pyfast        pyfast.ssm.fft_conv (CUDA: the fused Monarch-FFT Triton kernel, one program per row up
                to L = 4096, three-stage up to L = 65536; CPU: torch's FFT at 5-smooth sizes with D
                and the gates folded in)
  reference     pyfast.ssm.reference.fft_conv (FFT of size 2L)
  torch-native  the usual S4-style code: rfft of u and k at n = 2L, product, irfft, + D u
"""
import functools

import pytest
import torch

import pyfast
from pyfast.ssm import reference

SUITE = "ssm fft_conv: causal long convolution + D skip (forward)"
H = 768


def _cases():
    yield pytest.param((8, H, 1024), id="B8-L1024")
    yield pytest.param((2, H, 4096), id="B2-L4096")
    yield pytest.param((2, H, 4097), id="B2-L4097")
    for shape in ((64, H, 1024), (64, H, 4096), (16, H, 16384), (8, H, 65536)):
        yield pytest.param(shape, marks=pytest.mark.large, id=f"B{shape[0]}-L{shape[2]}")


GPU_ONLY_LENGTH = 16384  # the longest workloads are GPU-sized (the CPU reference needs several GiB)


@functools.lru_cache(maxsize=1)
def setup(shape, device):
    """Seeded ``(u (B, H, L) bfloat16, k (H, L) float32, D (H,) float32)``."""
    Bsz, _, L = shape
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(Bsz, H, L, generator=gen).to(torch.bfloat16)
    k = torch.randn(H, L, generator=gen) * torch.exp(-torch.arange(L) / 256.0)
    D = torch.randn(H, generator=gen)
    return u.to(device), k.to(device), D.to(device)


def torch_native(u, k, D):
    L = u.shape[-1]
    k_f = torch.fft.rfft(k, n=2 * L)
    u_f = torch.fft.rfft(u.float(), n=2 * L)
    y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L] + D.unsqueeze(-1) * u.float()
    return y.to(u.dtype)


PROVIDERS = {"pyfast": pyfast.ssm.fft_conv, "reference": reference.fft_conv, "torch-native": torch_native}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", list(_cases()))
def test_fft_conv_forward(measure, expect_close, device, shape, provider):
    Bsz, _, L = shape
    if device.type == "cpu" and L >= GPU_ONLY_LENGTH:
        pytest.skip(f"L = {L} is a GPU workload")
    u, k, D = setup(shape, device)
    fn = PROVIDERS[provider]
    ref = torch_native(u, k, D) if provider != "torch-native" else None
    measure(lambda: fn(u, k, D), suite=SUITE, workload=f"B={Bsz} H={H} L={L} bfloat16", provider=provider,
            bytes_moved=2 * u.numel() * 2 + k.numel() * 4,
            sizes={"B": Bsz, "H": H, "L": L, "dtype": "bfloat16", "k": "float32"},
            check=None if ref is None else expect_close(ref.float(), 1e-2, f"{provider} fft_conv"))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", [pytest.param((8, H, 1024), id="B8-L1024"),
                                   pytest.param((64, H, 4096), marks=pytest.mark.large, id="B64-L4096")])
def test_fft_conv_forward_backward(measure, device, shape, provider):
    """Forward and the gradients to u, k and D. Floor: u, y, grad y and grad u in bfloat16, k and
    grad k in float32."""
    Bsz, _, L = shape
    u, k, D = (t.clone().requires_grad_() for t in setup(shape, device))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    fn = PROVIDERS[provider]
    measure(lambda: torch.autograd.grad(fn(u, k, D), (u, k, D), grad), suite=SUITE + " (+ backward)",
            workload=f"forward+backward B={Bsz} H={H} L={L} bfloat16", provider=provider,
            bytes_moved=4 * u.numel() * 2 + 2 * k.numel() * 4,
            sizes={"B": Bsz, "H": H, "L": L, "dtype": "bfloat16", "k": "float32"})
