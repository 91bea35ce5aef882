"""The C++ eigenbasis kernel of KroneckerGrid (csrc/cpu/gp/kron_eigen_apply.cpp):
``P diag(L^p) P^T x`` and its halves, against the dense Kronecker product (small grids) and the
torch mode-product path (grids whose blocking splits into leading and trailing modes)."""
import math

import pytest
import torch

from pyfast import _ext
from pyfast.gp import _modes
from pyfast.gp.grid import KroneckerGrid

pytestmark = pytest.mark.skipif(
    _ext.cpu is None or not _ext.cpu.gp_kron_eigen_apply_available(),
    reason="pyfast._C with AVX2 + FMA unavailable",
)

# Sizes 1, primes, factors past the GEMM's 96-row block and 256-deep chunk (300, 600), and grids
# whose trailing block is one mode (3 x 200 x 200) or several.
DENSE_SIZES = [(1,), (7,), (64,), (1, 1), (5, 3), (61, 13), (3, 17, 2), (2, 3, 4, 5), (300, 2), (1, 300), (2, 600)]
SPLIT_SIZES = [(3, 200, 200), (64, 64, 64), (300, 130)]
# (rotate_in, power, rotate_out)
MODES = [(True, -1.0, True), (True, -0.5, True), (True, -1.0, False), (True, None, False), (False, None, True)]


def _grid(sizes, dtype, diagonals=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64, generator=gen)
        factors.append((a @ a.t() / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype))
    diag = [torch.rand(n, dtype=dtype, generator=gen) + 0.5 for n in sizes] if diagonals else None
    return KroneckerGrid(factors, 0.05, diag)


def _dense_expected(grid, x, rotate_in, power, rotate_out):
    P = grid._P[0].double()
    for p in grid._P[1:]:
        P = torch.kron(P, p.double())
    z = x.double()
    if rotate_in:
        z = P.t() @ z
        if power is not None:
            z = z * grid._eigenvalues.pow(power)[:, None]
    if rotate_out:
        z = P @ z
    return z


def _torch_expected(grid, x, rotate_in, power, rotate_out):
    z = x
    if rotate_in:
        z = _modes.kron_apply(grid._Pt, z, grid.sizes, x.shape[1])
        if power is not None:
            z = z * grid._eigenvalues.pow(power).to(x.dtype)[:, None]
    if rotate_out:
        z = _modes.kron_apply(grid._P, z, grid.sizes, x.shape[1])
    return z


def _check(got, expected, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = expected.abs().max().clamp_min(1e-30)
    assert float((got.double() - expected.double()).abs().max() / scale) <= tol


@pytest.mark.parametrize("sizes", DENSE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cols", [1, 3, 9])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"in{int(m[0])}-p{m[1]}-out{int(m[2])}")
def test_against_dense(sizes, dtype, cols, mode):
    grid = _grid(sizes, dtype, diagonals=len(sizes) == 2)
    x = torch.randn(math.prod(sizes), cols, dtype=dtype)
    got = grid._eigen_apply(x, *mode)
    _check(got, _dense_expected(grid, x, *mode), dtype)


@pytest.mark.parametrize("sizes", SPLIT_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cols", [1, 5])
@pytest.mark.parametrize("mode", MODES[::2], ids=lambda m: f"in{int(m[0])}-p{m[1]}-out{int(m[2])}")
def test_against_mode_products(sizes, dtype, cols, mode):
    grid = _grid(sizes, dtype)
    x = torch.randn(math.prod(sizes), cols, dtype=dtype)
    _check(grid._eigen_apply(x, *mode), _torch_expected(grid, x, *mode), dtype)


@pytest.mark.parametrize("sizes", [(5,), (5, 3), (3, 200, 200)], ids=lambda s: "x".join(map(str, s)))
def test_in_place(sizes):
    """``out`` may be ``x`` (the solve reuses its eigenbasis coefficients)."""
    grid = _grid(sizes, torch.float64)
    x = torch.randn(math.prod(sizes), 2, dtype=torch.float64)
    expected = _torch_expected(grid, x, False, None, True)
    got = grid._eigen_apply(x, False, None, True, out=x)
    assert got.data_ptr() == x.data_ptr()
    _check(got, expected, torch.float64)


def test_empty_columns():
    grid = _grid((4, 3), torch.float64)
    x = torch.empty(12, 0, dtype=torch.float64)
    assert grid._eigen_apply(x, True, -1.0, True).shape == (12, 0)


def test_solve_uses_kernel_and_matches_dense():
    """The grid routes its no-gradient solve through the kernel, and the answer is A^{-1} y."""
    sizes = (6, 5, 4)
    grid = _grid(sizes, torch.float64)
    y = torch.randn(math.prod(sizes), dtype=torch.float64)
    assert grid._eigen_kernel(y[:, None])
    A = grid.factors[0]
    for f in grid.factors[1:]:
        A = torch.kron(A, f)
    A = A + 0.05 * torch.eye(A.shape[0], dtype=torch.float64)
    torch.testing.assert_close(grid.solve(y), torch.linalg.solve(A, y), rtol=1e-10, atol=1e-12)
