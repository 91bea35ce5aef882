"""The C++ spectrum kernels of KroneckerGrid (csrc/cpu/gp): scaling by L^p and sum log L with
``L = noise + lam_1 (x) ... (x) lam_D`` computed on the fly, against the materialized L."""
import math

import pytest
import torch

from pyfast import _ext
from kernel_cases import rel_error
from pyfast.gp.grid import _outer_all, _spectrum_range

pytestmark = pytest.mark.skipif(_ext.cpu is None, reason=f"pyfast._C unavailable: {_ext.cpu_error}")

SIZES = [(1,), (7,), (64,), (3, 1), (4, 17), (5, 3, 4), (2, 3, 2, 5), (64, 64, 3)]


def _spectrum(sizes, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.rand(n, dtype=torch.float64, generator=gen) + 1e-3 for n in sizes]


def _args(lams, noise):
    return [l.data_ptr() for l in lams], [l.numel() for l in lams], noise


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("power", [-1.0, -0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cols", [1, 3])
def test_scale_by_spectrum(sizes, power, dtype, cols):
    lams, noise = _spectrum(sizes), 0.37
    z = torch.randn(math.prod(sizes), cols, dtype=dtype)
    expected = z * (_outer_all(lams) + noise).pow(power).to(dtype)[:, None]
    _ext.cpu.gp_scale_by_spectrum(_ext.DTYPE_TAG[dtype], z.data_ptr(), cols, *_args(lams, noise), power)
    torch.testing.assert_close(z, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [1.0, 1e-8, 1e40, 1e150, 1e300], ids=lambda s: f"lam~{s:g}")
def test_log_spectrum_sum(sizes, scale):
    """Products of blocks of L are renormalized so that no magnitude overflows or underflows; the
    widest spectra (beyond 2^480) take one log per element."""
    lams = _spectrum(sizes, scale ** (1 / len(sizes)))
    noise = 1e-3
    L = _outer_all(lams) + noise
    expected = torch.log(L).sum().item()
    got = _ext.cpu.gp_log_spectrum_sum(*_args(lams, noise))
    assert math.isfinite(got)
    assert abs(got - expected) <= 1e-13 * L.numel() * max(1.0, float(torch.log(L).abs().max()))


def test_spectrum_range_is_exact():
    """min / max of L from the factor extremes, negative eigenvalues included."""
    lams = [torch.tensor([-0.1, 0.5, 2.0], dtype=torch.float64), torch.tensor([-3.0, 1.0], dtype=torch.float64),
            torch.tensor([0.2, 4.0], dtype=torch.float64)]
    L = _outer_all(lams) + 0.5
    low, high = _spectrum_range([(float(l.min()), float(l.max())) for l in lams], 0.5)
    assert (low, high) == (float(L.min()), float(L.max()))


def _triton_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.mark.triton
@pytest.mark.parametrize("sizes", [(1,), (7,), (4, 17), (2, 3, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("power", [-1.0, -0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_spectrum_kernels(sizes, power, dtype):
    from pyfast.triton_kernels.gp import log_spectrum_sum, scale_by_spectrum, spectrum_layout

    device = _triton_device()
    lams, noise = [l.to(device) for l in _spectrum(sizes, 3.0)], 0.21
    L = _outer_all(lams) + noise
    z = torch.randn(math.prod(sizes), 2, dtype=dtype, device=device)
    expected = z * L.pow(power).to(dtype)[:, None]
    layout = spectrum_layout(lams)
    scale_by_spectrum(z, layout, noise, power)
    torch.testing.assert_close(z, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
    got = float(log_spectrum_sum(layout, noise))
    assert abs(got - float(torch.log(L).sum())) <= 1e-13 * L.numel() * max(1.0, float(torch.log(L).abs().max()))


@pytest.mark.triton
def test_grid_on_triton_matches_dense():
    """KroneckerGrid float32 with the Triton mode products and spectrum kernels: solve, log-det
    and the inverse square root against dense float64."""
    import pyfast
    from pyfast.gp import KroneckerGrid, reference as R

    device = _triton_device()
    factors = [R.rbf(x, x, 0.3) for x in (torch.rand(n, dtype=torch.float64) for n in (5, 3, 4))]
    y = torch.randn(60, 2, dtype=torch.float64)
    with pyfast.use_backend("triton"):
        grid = KroneckerGrid([f.float().to(device) for f in factors], 0.1)
        alpha, ld = grid.solve(y.float().to(device)), grid.logdet()
        root = grid.inv_sqrt_mv(y.float().to(device))
    assert rel_error(alpha, R.solve(factors, 0.1, y)) < 1e-5
    assert rel_error(ld, R.logdet(factors, 0.1)) < 1e-6
    # A^{-1/2} applied twice is the solve.
    with pyfast.use_backend("triton"):
        twice = grid.inv_sqrt_mv(root)
    assert rel_error(twice, R.solve(factors, 0.1, y)) < 1e-5
