"""s4d_kernel kernels against pyfast.ssm.reference (float64), gradients, opcheck, bad input."""
import pytest
import torch

import pyfast
from kernel_cases import assert_as_accurate_as_reference, assert_close
from pyfast.ssm import reference
from pyfast.ssm.ops import REAL_DTYPES
from ssm_inputs import ssm_params

# (channels, H, N, L): single everything, primes, non-multiples of the 64-position block, L past
# the exact re-anchoring period (1024) and 2^12 + 1.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 3, 17, 65), (3, 2, 64, 1000), (1, 4, 33, 4097)]
SMALL_SHAPES = [s for s in SHAPES if s[1] * s[2] * s[3] < 5000]


def _cases(kernel):
    shapes = SMALL_SHAPES if kernel.interpreted else SHAPES
    dtypes = [d for d in kernel.dtypes if d in REAL_DTYPES]
    return [(shape, dtype) for shape in shapes for dtype in dtypes]


def _params(shape, dtype, device, requires_grad=False):
    channels, H, N, L = shape
    params = [p.to(device).requires_grad_(requires_grad) for p in ssm_params(channels, H, N, dtype)]
    return params, L


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_matches_reference(kernel, discretization):
    for shape, dtype in _cases(kernel):
        (dt, A, C), L = _params(shape, dtype, kernel.device)
        with pyfast.use_backend(kernel.backend):
            K = pyfast.ssm.s4d_kernel(dt, A, C, L, discretization=discretization)
        ref = reference.s4d_kernel(dt.cpu().double(), A.cpu().to(torch.complex128), C.cpu().to(torch.complex128), L,
                                   discretization=discretization)
        assert K.dtype == dtype
        assert_close(K, ref, dtype, f"{shape} {dtype} {discretization}")


def test_noncontiguous_and_conjugate_views(kernel):
    dtype = torch.float32
    (dt, A, C), L = _params((2, 3, 6, 40), dtype, kernel.device)
    A_t = A.t().contiguous().t()                      # column-major (H, N)
    C_conj = C.conj().contiguous().conj()             # a lazily conjugated view
    dt_strided = torch.stack([dt, dt], -1)[:, 0]       # stride 2
    with pyfast.use_backend(kernel.backend):
        K = pyfast.ssm.s4d_kernel(dt_strided, A_t, C_conj, L)
    assert_close(K, reference.s4d_kernel(dt.double(), A.to(torch.complex128), C.to(torch.complex128), L), dtype)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_gradients_match_reference(kernel, discretization):
    for shape, dtype in _cases(kernel):
        (dt, A, C), L = _params(shape, dtype, kernel.device, requires_grad=True)
        grad_out = torch.randn(shape[0], shape[1], L, dtype=dtype, device=kernel.device)
        with pyfast.use_backend(kernel.backend):
            K = pyfast.ssm.s4d_kernel(dt, A, C, L, discretization=discretization)
        grads = torch.autograd.grad(K, (dt, A, C), grad_out)
        ref_grads = _reference_grads((dt, A, C), L, discretization, grad_out, torch.float64)
        low_grads = _reference_grads((dt, A, C), L, discretization, grad_out, dtype)
        for name, g, r, r_low in zip(("dt", "A", "C"), grads, ref_grads, low_grads):
            assert g.dtype == (dtype if name == "dt" else A.dtype)
            # The dt gradient sums l-weighted terms with cancellation: the 2x-reference rule applies.
            assert_as_accurate_as_reference(_real(g), _real(r), _real(r_low), dtype, f"grad {name} {shape} {dtype}")


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _reference_grads(params, L, discretization, grad_out, dtype):
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    leaves = [p.detach().cpu().to(dtype if p.dtype.is_floating_point else cdtype).requires_grad_() for p in params]
    K = reference.s4d_kernel(*leaves, L, discretization=discretization)
    return torch.autograd.grad(K, leaves, grad_out.cpu().to(dtype))


def test_gradcheck_float64():
    (dt, A, C), L = _params((2, 2, 3, 23), torch.float64, "cpu", requires_grad=True)
    with pyfast.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *p: pyfast.ssm.s4d_kernel(*p, L, discretization="bilinear"),
                                        (dt, A, C))


def test_gradcheck_reference():
    (dt, A, C), L = _params((1, 2, 3, 9), torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda *p: reference.s4d_kernel(*p, L), (dt, A, C))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kernel, requires_grad):
    dtype = torch.float64 if torch.float64 in kernel.dtypes else torch.float32
    (dt, A, C), L = _params((2, 3, 5, 37), dtype, kernel.device)
    pairs = [torch.view_as_real(p).contiguous().requires_grad_(requires_grad) for p in (A, C)]
    for discretization in ("zoh", "bilinear"):
        args = (dt.clone().requires_grad_(requires_grad), *pairs, L, discretization, kernel.backend)
        torch.library.opcheck(torch.ops.pyfast.ssm_s4d_kernel.default, args)


def test_backend_choice():
    dt, A, C = ssm_params(1, 2, 3, torch.float32)
    assert pyfast.backend_for("ssm.s4d_kernel", dt).backend == "cpu"
    with pyfast.use_backend("reference"):
        torch.testing.assert_close(pyfast.ssm.s4d_kernel(dt, A, C, 5), reference.s4d_kernel(dt, A, C, 5))


def _low_precision_cases(kernel):
    shapes = SMALL_SHAPES if kernel.interpreted else SHAPES
    return [(shape, dtype) for shape in shapes for dtype in kernel.dtypes if dtype in (torch.float16, torch.bfloat16)]


def test_low_precision_kernel(kernel):
    """float16/bfloat16 dt: K in that dtype, computed in float32 from complex64 A, C."""
    for shape, dtype in _low_precision_cases(kernel):
        (dt, A, C), L = _params(shape, torch.float32, kernel.device)
        dt = dt.to(dtype)
        for discretization in ("zoh", "bilinear"):
            with pyfast.use_backend(kernel.backend):
                K = pyfast.ssm.s4d_kernel(dt, A, C, L, discretization=discretization)
            assert K.dtype == dtype
            ref = reference.s4d_kernel(dt.cpu().double(), A.cpu().to(torch.complex128), C.cpu().to(torch.complex128),
                                       L, discretization=discretization)
            assert_close(K, ref, dtype, f"{shape} {dtype} {discretization}")


def test_low_precision_pairs_and_gradients(kernel):
    """`s4d_kernel_real` with float16/bfloat16 (re, im) pairs: gradients come back in the pairs' dtype
    and match the float64 reference gradients at the rounded parameters."""
    cases = _low_precision_cases(kernel)
    for shape, dtype in cases[:1] if kernel.interpreted else cases[:3]:
        (dt, A, C), L = _params(shape, torch.float32, kernel.device)
        leaves = [dt.to(dtype), torch.view_as_real(A).to(dtype), torch.view_as_real(C).to(dtype)]
        leaves = [t.contiguous().requires_grad_() for t in leaves]
        grad_out = torch.randn(shape[0], shape[1], L, device=kernel.device).to(dtype)
        with pyfast.use_backend(kernel.backend):
            K = pyfast.ssm.s4d_kernel_real(*leaves, L)
        grads = torch.autograd.grad(K, leaves, grad_out)
        ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
        ref_A, ref_C = (torch.view_as_complex(t) for t in ref_leaves[1:])
        ref = reference.s4d_kernel(ref_leaves[0], ref_A, ref_C, L)
        assert K.dtype == dtype
        assert_close(K, ref, dtype, f"K {shape} {dtype}")
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
        for name, g, r in zip(("dt", "A", "C"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, r, dtype, f"grad {name} {shape} {dtype}")
        if shape == cases[0][0]:
            torch.library.opcheck(torch.ops.pyfast.ssm_s4d_kernel.default, (*leaves, L, "bilinear", kernel.backend))
