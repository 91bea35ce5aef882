"""kron_mv and mode_product against the dense Kronecker reference: values, gradients, opcheck."""
import math

import pytest
import torch

import pyfast
from pyfast.gp import kron_mv, mode_product, reference
from pyfast.gp.ops import _kron_mv_factor_grads_op, _kron_mv_op, _mode_product_op
from kernel_cases import assert_close

# (factor shapes (m_d, n_d), columns B or None for a 1-D vector)
CASES = [
    ([(5, 5)], None),
    ([(1, 1), (3, 3)], 2),
    ([(7, 7), (3, 3)], None),
    ([(4, 3), (2, 5), (3, 2)], 3),
    ([(17, 17), (1, 1), (6, 6)], 1),
    ([(3, 3), (2, 2), (5, 5), (2, 2)], None),
    ([(19, 19), (33, 33)], 4),
    ([(0, 3), (2, 2)], 2),
    ([(3, 3), (2, 2)], 0),
]


def _inputs(shapes, cols, dtype, device, transpose=False, requires_grad=False):
    factors = [torch.randn(m, n, dtype=dtype, device=device) / math.sqrt(max(n, 1)) for m, n in shapes]
    rows = math.prod(s[0 if transpose else 1] for s in shapes)
    v = torch.randn(rows, *(() if cols is None else (cols,)), dtype=dtype, device=device)
    if requires_grad:
        factors = [f.requires_grad_() for f in factors]
        v.requires_grad_()
    return factors, v


def _ids(case):
    shapes, cols = case
    return "x".join(f"{m}:{n}" for m, n in shapes) + f"-B{cols}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("transpose", [False, True])
def test_kron_mv_matches_reference(kernel, case, transpose):
    shapes, cols = case
    for dtype in kernel.dtypes:
        if dtype in (torch.float16, torch.bfloat16):
            continue  # checked separately below with the low-precision rule
        factors, v = _inputs(shapes, cols, dtype, kernel.device, transpose)
        ref = reference.kron_mv([f.double() for f in factors], v.double(), transpose=transpose)
        with pyfast.use_backend(kernel.backend):
            out = kron_mv(factors, v, transpose=transpose)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, f"kron_mv {dtype}")


@pytest.mark.parametrize("case", CASES[:7], ids=[_ids(c) for c in CASES[:7]])
def test_kron_mv_gradients(kernel, case):
    shapes, cols = case
    dtype = torch.float64 if kernel.backend == "cpu" else torch.float32
    factors, v = _inputs(shapes, cols, dtype, kernel.device, requires_grad=True)
    with pyfast.use_backend(kernel.backend):
        out = kron_mv(factors, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*factors, v], g)
    f64 = [f.detach().double().requires_grad_() for f in factors]
    v64 = v.detach().double().requires_grad_()
    ref = torch.autograd.grad(reference.kron_mv(f64, v64), [*f64, v64], g.double())
    for got, want in zip(grads, ref):
        assert_close(got, want, dtype, "kron_mv grad")


def test_kron_mv_gradcheck():
    factors, v = _inputs([(3, 4), (2, 2), (3, 2)], 2, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: kron_mv(list(a[:-1]), a[-1]), (*factors, v))
    assert torch.autograd.gradcheck(lambda *a: kron_mv(list(a[:-1]), a[-1], transpose=True),
                                    (*factors, torch.randn(18, 2, dtype=torch.float64, requires_grad=True)))


def test_kron_mv_non_contiguous():
    base = torch.randn(6, 6, dtype=torch.float64)
    factors = [base.t(), torch.randn(4, 8, dtype=torch.float64)[:, ::2]]
    v = torch.randn(2, 24, dtype=torch.float64).t()  # (24, 2), strided
    out = kron_mv(factors, v)
    assert_close(out, reference.kron_mv(factors, v), torch.float64, "non-contiguous")


def test_kron_mv_low_precision(kernel):
    for dtype in kernel.dtypes:
        if dtype not in (torch.float16, torch.bfloat16):
            continue
        factors, v = _inputs([(19, 19), (6, 6)], 3, dtype, kernel.device)
        with pyfast.use_backend(kernel.backend):
            out = kron_mv(factors, v)
        ref = reference.kron_mv([f.double() for f in factors], v.double())
        assert_close(out, ref, dtype, f"kron_mv {dtype}")


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_mode_product(kernel, mode, transpose):
    grid = [4, 7, 3]
    dtype = torch.float64 if kernel.backend == "cpu" else torch.float32
    m = 5
    shape = (grid[mode], m) if transpose else (m, grid[mode])
    matrix = torch.randn(*shape, dtype=dtype, device=kernel.device, requires_grad=True)
    v = torch.randn(math.prod(grid), 2, dtype=dtype, device=kernel.device, requires_grad=True)
    with pyfast.use_backend(kernel.backend):
        out = mode_product(matrix, v, grid, mode, transpose=transpose)
    m64, v64 = matrix.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = reference.mode_product(m64, v64, grid, mode, transpose=transpose)
    assert_close(out, ref, dtype, "mode_product")
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [matrix, v], g), torch.autograd.grad(ref, [m64, v64], g.double())):
        assert_close(got, want, dtype, "mode_product grad")


def test_opcheck():
    factors, v = _inputs([(3, 4), (2, 2), (3, 2)], 2, torch.float64, "cpu", requires_grad=True)
    torch.library.opcheck(_kron_mv_op, (factors, v, False, "torch"))
    torch.library.opcheck(_kron_mv_op, ([f.detach() for f in factors], torch.randn(18, 1, dtype=torch.float64), True, "torch"))
    plain = [f.detach() for f in factors]
    torch.library.opcheck(_kron_mv_factor_grads_op, (plain, v.detach(), torch.randn(18, 2, dtype=torch.float64), False, "torch"))
    m = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(24, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(_mode_product_op, (m, x, [3, 2, 4], 1, False, "torch"))


def test_compile_fullgraph():
    factors, v = _inputs([(4, 4), (3, 3)], 2, torch.float32, "cpu")
    out = torch.compile(lambda f, x: kron_mv(f, x), fullgraph=True)(factors, v)
    assert_close(out, reference.kron_mv([f.double() for f in factors], v.double()), torch.float32, "compiled")


def test_reference_backend_is_dense():
    factors, v = _inputs([(3, 3), (2, 2)], 1, torch.float64, "cpu")
    with pyfast.use_backend("reference"):
        out = kron_mv(factors, v)
    assert torch.equal(out, reference.kron(factors) @ v)
