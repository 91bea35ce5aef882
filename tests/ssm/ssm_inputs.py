"""Random SSM parameters and signals for the tests (never zeros)."""
import torch


def ssm_params(channels: int, H: int, N: int, dtype=torch.float64, *, seed: int = 0):
    """``(dt (H,), A (H, N) complex, C (channels, H, N) complex)``: stable A, dt in [1e-3, 1e-1]."""
    gen = torch.Generator().manual_seed(seed)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dt = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(-6.9, -2.3, generator=gen))
    real = -torch.empty(H, N, dtype=torch.float64).uniform_(0.05, 1.0, generator=gen)
    imag = torch.randn(H, N, dtype=torch.float64, generator=gen) * 10
    A = torch.complex(real, imag)
    C = torch.complex(torch.randn(channels, H, N, dtype=torch.float64, generator=gen),
                      torch.randn(channels, H, N, dtype=torch.float64, generator=gen))
    return dt.to(dtype), A.to(cdtype), C.to(cdtype)


def signal(*shape, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
