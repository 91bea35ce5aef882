"""companion_kernel (transfer function + FFT) against its matrix-power definition."""
import pytest
import torch

import pyfast
from kernel_cases import assert_as_accurate_as_reference, assert_close
from pyfast.ssm import reference


def _params(H, d, dtype=torch.float64, radius=0.9, seed=0):
    """Random a with all companion eigenvalues inside |z| < radius (a polynomial from stable roots)."""
    gen = torch.Generator().manual_seed(seed)
    roots = radius * torch.rand(H, d, dtype=torch.float64, generator=gen) * torch.exp(
        2j * torch.pi * torch.rand(H, d, dtype=torch.float64, generator=gen))
    roots = torch.cat([roots[:, : d // 2], roots[:, : d // 2].conj(), roots.real[:, d // 2 * 2:].to(roots.dtype)], 1)
    poly = torch.ones(H, 1, dtype=roots.dtype)
    for i in range(d):  # prod (x - r_i) = x^d - sum_k a_k x^k  =>  a_k = -poly coefficient of x^k
        poly = torch.cat([poly, torch.zeros(H, 1, dtype=roots.dtype)], 1) - roots[:, i:i + 1] * torch.cat(
            [torch.zeros(H, 1, dtype=roots.dtype), poly], 1)
    a = -poly.real[:, 1:].flip(-1)  # poly holds x^d, x^(d-1), ..., 1 (highest first)
    b = torch.randn(H, d, dtype=torch.float64, generator=gen)
    c = torch.randn(H, d, dtype=torch.float64, generator=gen)
    return a.to(dtype), b.to(dtype), c.to(dtype)


def test_params_are_stable():
    a, _, _ = _params(3, 7)
    assert torch.linalg.eigvals(reference.companion_matrix(a)).abs().max() < 0.9 + 1e-9


@pytest.mark.parametrize("H,d,L", [(1, 1, 1), (2, 4, 3), (3, 7, 97), (2, 16, 10), (2, 64, 300)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_matrix_powers(H, d, L, dtype):
    a, b, c = _params(H, d, dtype)
    K = pyfast.ssm.companion_kernel(a, b, c, L)
    ref = reference.companion_kernel_matrix_power(a.double(), b.double(), c.double(), L)
    assert K.dtype == dtype
    if dtype == torch.float64:
        assert_close(K, ref, dtype, f"H={H} d={d} L={L}")
    else:  # the division by det(I - zA) amplifies rounding: the 2x-reference rule applies
        low = reference.companion_kernel_matrix_power(a, b, c, L)
        assert_as_accurate_as_reference(K, ref, low, dtype, f"H={H} d={d} L={L}")


def test_gradients():
    a, b, c = (t.requires_grad_() for t in _params(2, 5, radius=0.8))
    assert torch.autograd.gradcheck(lambda *p: pyfast.ssm.companion_kernel(*p, 23), (a, b, c), fast_mode=True)
    grads = torch.autograd.grad(pyfast.ssm.companion_kernel(a, b, c, 40).sin().sum(), (a, b, c))
    ref = torch.autograd.grad(reference.companion_kernel_matrix_power(a, b, c, 40).sin().sum(), (a, b, c))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_bad_inputs():
    a, b, c = _params(2, 4)
    with pytest.raises(ValueError, match=r"companion_kernel: the companion matrices must be stable"):
        pyfast.ssm.companion_kernel(a * 0 + torch.tensor([0, 0, 0, 1.5], dtype=a.dtype), b, c, 8)
    with pytest.raises(ValueError, match=r"companion_kernel: a, b and c must share shape"):
        pyfast.ssm.companion_kernel(a, b[:, :3], c, 8)
    with pytest.raises(ValueError, match=r"companion_kernel: L must be in \[1, inf\]"):
        pyfast.ssm.companion_kernel(a, b, c, 0)
    with pytest.raises(TypeError, match=r"companion_kernel: a must have dtype in"):
        pyfast.ssm.companion_kernel(a.to(torch.complex128), b, c, 8)
    with pytest.raises(ValueError, match=r"companion_kernel: c has non-finite values"):
        pyfast.ssm.companion_kernel(a, b, c * float("inf"), 8)


def test_stability_test_matches_eigenvalues():
    from pyfast.ssm.companion import is_stable

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(200, 5, dtype=torch.float64, generator=gen) * 0.6
    radius = torch.linalg.eigvals(reference.companion_matrix(a)).abs().amax(-1)
    clear = (radius - 1).abs() > 1e-9
    assert torch.equal(is_stable(a)[clear], (radius < 1)[clear])
    assert 20 < int((radius < 1).sum()) < 180  # both outcomes occur
