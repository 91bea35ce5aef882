"""fft_conv against the O(L^2) definition (float64), gradients, low precision, opcheck, bad input."""
import pytest
import torch

import pyfast
from kernel_cases import assert_as_accurate_as_reference, assert_close
from pyfast.ssm import reference
from pyfast.ssm._fft_conv import fast_size
from ssm_inputs import signal

# (B, H, L): odd lengths, 1, primes, a non-smooth 2L - 1, and 2^12 + 1.
SHAPES = [(1, 1, 1), (2, 3, 3), (1, 2, 17), (2, 3, 1000), (1, 2, 4097)]


def _inputs(shape, dtype, bidirectional, *, gates=True, skip=True, requires_grad=False):
    Bsz, H, L = shape
    u = signal(Bsz, H, L, dtype=dtype)
    k = signal(*((2, H, L) if bidirectional else (H, L)), dtype=torch.float64, seed=2) / L**0.5
    k = k.to(torch.float64 if dtype == torch.float64 else torch.float32)
    D = signal(H, dtype=k.dtype, seed=3) if skip else None
    pre = signal(Bsz, H, L, dtype=dtype, seed=4) if gates else None
    post = signal(Bsz, H, L, dtype=dtype, seed=5) if gates else None
    tensors = [u, k, D, pre, post]
    if requires_grad:
        tensors = [t if t is None else t.requires_grad_() for t in tensors]
    return tensors


def _call(fn, u, k, D, pre, post, bidirectional):
    return fn(u, k, D, bidirectional=bidirectional, pregate=pre, postgate=post)


def _double(tensors):
    return [t if t is None else t.detach().double() for t in tensors]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_matches_direct_sum(bidirectional, gates):
    for shape in SHAPES:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            tensors = _inputs(shape, dtype, bidirectional, gates=gates)
            y = _call(pyfast.ssm.fft_conv, *tensors, bidirectional)
            assert y.dtype == dtype and y.shape == shape
            ref = _call(reference.fft_conv_direct if shape[2] < 2000 else reference.fft_conv, *_double(tensors),
                        bidirectional)
            if dtype in (torch.float16, torch.bfloat16):
                # The output is rounded to dtype: compare with the reference run in dtype.
                low = _call(reference.fft_conv, *tensors, bidirectional)
                assert_as_accurate_as_reference(y, ref, low, dtype, f"{shape} {dtype}")
            else:
                assert_close(y, ref, dtype, f"{shape} {dtype}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_match_reference(bidirectional):
    for shape in SHAPES:
        for dtype in (torch.float64, torch.float32):
            tensors = _inputs(shape, dtype, bidirectional, requires_grad=True)
            grad_out = signal(*shape, dtype=dtype, seed=9)
            grads = torch.autograd.grad(_call(pyfast.ssm.fft_conv, *tensors, bidirectional), tensors, grad_out)
            leaves = [t.requires_grad_() for t in _double(tensors)]
            ref_grads = torch.autograd.grad(_call(reference.fft_conv, *leaves, bidirectional), leaves, grad_out.double())
            for name, g, r in zip(("u", "k", "D", "pregate", "postgate"), grads, ref_grads):
                assert g.dtype == tensors[("u", "k", "D", "pregate", "postgate").index(name)].dtype
                assert_close(g, r, dtype, f"grad {name} {shape} {dtype} bidirectional={bidirectional}")


def test_gradcheck_float64():
    for bidirectional in (False, True):
        tensors = _inputs((2, 2, 7), torch.float64, bidirectional, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: _call(pyfast.ssm.fft_conv, *t, bidirectional), tensors,
                                        fast_mode=True)


def test_optional_arguments_absent():
    u, k, _, _, _ = _inputs((2, 3, 11), torch.float64, False, gates=False, skip=False, requires_grad=True)
    y = pyfast.ssm.fft_conv(u, k)
    torch.testing.assert_close(y, reference.fft_conv_direct(u, k))
    gu, gk = torch.autograd.grad(y.square().sum(), (u, k))
    ru, rk = torch.autograd.grad(reference.fft_conv_direct(u, k).square().sum(), (u, k))
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gk, rk)


def test_noncontiguous_input():
    u = signal(2, 40, 3, dtype=torch.float32).transpose(1, 2)  # (B, H, L) with stride 1 along H
    k = signal(3, 40, dtype=torch.float32, seed=2)
    assert not u.is_contiguous()
    assert_close(pyfast.ssm.fft_conv(u, k), reference.fft_conv_direct(u.double(), k.double()), torch.float32)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_opcheck(requires_grad, bidirectional):
    tensors = _inputs((2, 3, 13), torch.float64, bidirectional, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.pyfast.ssm_fft_conv.default, (*tensors, bidirectional, "cpu"))


def test_fast_size():
    for n in (1, 2, 7, 97, 1999, 8193):
        size = fast_size(n)
        assert size >= n
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        assert rest == 1
        assert all(not (n <= m < size) for m in (2**a * 3**b * 5**c for a in range(15) for b in range(9) for c in range(7)))


def test_bad_inputs():
    u, k, D, pre, _ = _inputs((2, 3, 8), torch.float32, False)
    with pytest.raises(ValueError, match=r"fft_conv: u must be 3-D \(B, H, L\), got shape \(3, 8\)"):
        pyfast.ssm.fft_conv(u[0], k)
    with pytest.raises(ValueError, match=r"fft_conv: k must have shape \(H, L\) = \(3, 8\) to match u"):
        pyfast.ssm.fft_conv(u, k[:2])
    with pytest.raises(ValueError, match=r"k must have shape \(2, H, L\) for bidirectional=True"):
        pyfast.ssm.fft_conv(u, k, bidirectional=True)
    with pytest.raises(ValueError, match=r"fft_conv: D must have shape \(H,\) = \(3,\), got \(4,\)"):
        pyfast.ssm.fft_conv(u, k, torch.ones(4))
    with pytest.raises(ValueError, match=r"fft_conv: pregate must have the shape of u"):
        pyfast.ssm.fft_conv(u, k, pregate=pre[:1])
    with pytest.raises(ValueError, match=r"fft_conv: L must be in \[1, 1048576\]"):
        pyfast.ssm.fft_conv(u[..., :0], k[..., :0])
    with pytest.raises(TypeError, match=r"fft_conv: k must have dtype in"):
        pyfast.ssm.fft_conv(u, k.to(torch.complex64))
    with pytest.raises(ValueError, match=r"fft_conv: k has non-finite values"):
        pyfast.ssm.fft_conv(u, k * float("nan"))
