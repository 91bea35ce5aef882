"""S4D kernel generation K (channels=1, H, L) from diagonal A (H, N), forward and forward+backward.

Workloads: H = 768, N = 64, L = 4096 and 16384 (float32 parameters, complex64 A and C), and
L = 4096 with bfloat16 dt (K written in bfloat16, float32 arithmetic);
``--quick`` keeps L = 4096 at H = 96; L = 16384 runs on the GPU only (the reference's (H, N, L)
complex temporary is 6.4 GB). Bytes moved: the output write ``H L 4`` plus the parameters
``H N (8 + 8) + H 4`` (the floor; the materialized reference also writes and reads (H, N, L)).

Providers:
  pyfast        pyfast.ssm.s4d_kernel (fused C++ / Triton kernels)
  reference     pyfast.ssm.reference.s4d_kernel: exp of the (H, N, L) Vandermonde matrix + einsum
  torch-native  the same block factorization as the kernels, in torch: exp(j w) for j < 64 and
                block anchors exp(l0 w), then one batched complex matmul per channel h
"""
import functools

import pytest
import torch

import pyfast
from pyfast.ssm import reference

SUITE = "ssm s4d_kernel: S4D Vandermonde kernel"
N = 64
BLOCK = 64


def _cases():
    yield pytest.param((96, 4096), torch.float32, id="H96-L4096")
    yield pytest.param((768, 4096), torch.float32, marks=pytest.mark.large, id="H768-L4096")
    yield pytest.param((768, 16384), torch.float32, marks=pytest.mark.large, id="H768-L16384")
    yield pytest.param((768, 4096), torch.bfloat16, marks=pytest.mark.large, id="H768-L4096-bf16")


@functools.lru_cache(maxsize=1)
def setup(shape, device):
    """Seeded ``(dt (H,), A (H, N), C (1, H, N))``: S4D-Lin A, dt log-uniform in [1e-3, 1e-1]."""
    H, _ = shape
    gen = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.empty(H).uniform_(-6.9, -2.3, generator=gen))
    A = pyfast.ssm.s4d_lin_init(H, N)
    C = torch.complex(torch.randn(1, H, N, generator=gen), torch.randn(1, H, N, generator=gen))
    return dt.to(device), A.to(device), C.to(device)


def torch_native(dt, A, C, L, discretization="zoh"):
    W, w = reference.discretize(dt.to(A.real.dtype), A, C, discretization)  # 16-bit dt: float32 arithmetic
    blocks = -(-L // BLOCK)
    j = torch.arange(BLOCK, device=dt.device, dtype=w.real.dtype)
    table = torch.exp(w.unsqueeze(-1) * j)                              # (H, N, BLOCK)
    anchors = torch.exp(w.unsqueeze(-1) * (j[:1] + BLOCK * torch.arange(blocks, device=dt.device, dtype=j.dtype)))
    scaled = (W.unsqueeze(-1) * anchors).transpose(-1, -2)             # (channels, H, blocks, N)
    K = 2 * torch.matmul(scaled, table).real                            # (channels, H, blocks, BLOCK)
    return K.reshape(*K.shape[:2], -1)[..., :L].to(dt.dtype)


PROVIDERS = {"pyfast": pyfast.ssm.s4d_kernel, "reference": reference.s4d_kernel, "torch-native": torch_native}


def _bytes(H, L):
    return H * L * 4 + H * N * 16 + H * 4


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape,dtype", list(_cases()))
def test_s4d_kernel_forward(measure, expect_close, device, shape, dtype, provider):
    H, L = shape
    if device.type == "cpu" and L >= 16384:
        pytest.skip(f"L = {L} is a GPU workload")
    dt, A, C = setup(shape, device)
    dt = dt.to(dtype)
    ref = torch_native(dt.double(), A.to(torch.complex128), C.to(torch.complex128), L)
    fn = PROVIDERS[provider]
    name = str(dtype).replace("torch.", "")
    measure(lambda: fn(dt, A, C, L), suite=SUITE, workload=f"forward H={H} N={N} L={L} {name}", provider=provider,
            bytes_moved=_bytes(H, L) * dtype.itemsize // 4, sizes={"H": H, "N": N, "L": L, "dtype": name},
            check=expect_close(ref, 1e-4 if dtype == torch.float32 else 1e-2, f"{provider} s4d_kernel"))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", [pytest.param(c.values[0], marks=c.marks, id=c.id) for c in list(_cases())[:2]])
def test_s4d_kernel_forward_backward(measure, device, shape, provider):
    H, L = shape
    params = [p.clone().requires_grad_() for p in setup(shape, device)]
    grad = torch.randn(1, H, L, generator=torch.Generator().manual_seed(1)).to(device)
    fn = PROVIDERS[provider]
    measure(lambda: torch.autograd.grad(fn(*params, L), params, grad), suite=SUITE + " (+ backward)",
            workload=f"forward+backward H={H} N={N} L={L}", provider=provider,
            bytes_moved=2 * _bytes(H, L), sizes={"H": H, "N": N, "L": L, "dtype": "float32"})
