"""fft_conv per kernel backend (the `kernel` fixture): the CPU path (torch.fft) and the fused Monarch
FFT Triton kernel, against the O(L^2) definition in float64; the torch.fft fallback above the fused
kernel's length; gradients through each backend's forward; opcheck."""
import pytest
import torch

import pyfast
from pyfast._backend import registered_ops
from kernel_cases import assert_as_accurate_as_reference, assert_close, make_case
from pyfast.ssm import reference
from ssm_inputs import signal

# (B, H, L): 1, primes, a length with L = n / 2 at the smallest transform (128), a non-power of two
# across two column blocks of the tile, and 1000 (a 2048-point transform, N1 = 32: half-row stages).
SHAPES = [(1, 1, 1), (2, 3, 7), (1, 2, 128), (2, 2, 131), (1, 2, 1000)]


def _inputs(shape, dtype, bidirectional, device, *, gates=True, skip=True):
    Bsz, H, L = shape
    u = signal(Bsz, H, L, dtype=dtype)
    k = (signal(*((2, H, L) if bidirectional else (H, L)), dtype=torch.float64, seed=2) / L**0.5).float()
    D = signal(H, seed=3) if skip else None
    pre = signal(Bsz, H, L, dtype=dtype, seed=4) if gates else None
    post = signal(Bsz, H, L, dtype=dtype, seed=5) if gates else None
    return [t if t is None else t.to(device) for t in (u, k, D, pre, post)]


def _run(backend, u, k, D, pre, post, bidirectional):
    with pyfast.use_backend(backend):
        return pyfast.ssm.fft_conv(u, k, D, bidirectional=bidirectional, pregate=pre, postgate=post)


def _reference(tensors, bidirectional, dtype=torch.float64):
    u, k, D, pre, post = (t if t is None else t.detach().cpu().to(dtype) for t in tensors)
    direct = reference.fft_conv_direct if dtype == torch.float64 else reference.fft_conv
    return direct(u, k, D, bidirectional=bidirectional, pregate=pre, postgate=post)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_matches_direct_sum(kernel, bidirectional, gates):
    for shape in SHAPES:
        for dtype in [d for d in kernel.dtypes if d != torch.float64]:
            tensors = _inputs(shape, dtype, bidirectional, kernel.device, gates=gates, skip=gates)
            y = _run(kernel.backend, *tensors, bidirectional)
            assert y.dtype == dtype and y.shape == shape and y.device.type == kernel.device.type
            ref = _reference(tensors, bidirectional)
            what = f"{kernel} {shape} {dtype} bidirectional={bidirectional} gates={gates}"
            if dtype == torch.float32:
                assert_close(y, ref, dtype, what)
            else:  # the output is rounded to dtype: compare with the reference run in dtype
                assert_as_accurate_as_reference(y, ref, _reference(tensors, bidirectional, dtype), dtype, what)


def test_noncontiguous_input(kernel):
    u = signal(2, 40, 3, dtype=torch.float32).transpose(1, 2).to(kernel.device)  # (B, H, L), stride 1 along H
    k = signal(3, 40, seed=2).to(kernel.device)
    pre = signal(2, 3, 80, seed=4)[..., ::2].to(kernel.device)
    assert not u.is_contiguous() and not pre.is_contiguous()
    y = _run(kernel.backend, u, k, None, pre, None, False)
    assert_close(y, reference.fft_conv_direct(u.double().cpu(), k.double().cpu(), pregate=pre.double().cpu()),
                 torch.float32)


@pytest.mark.triton
def test_three_stage_and_torch_fft_paths(monkeypatch):
    """Above the one-program transform size the three-stage path runs (N0 = 2 and 8 here, with the
    on-chip size lowered to 256), above its own limit the torch.fft path."""
    kernel = make_case("triton")
    from pyfast.triton_kernels.ssm import fft_conv as fused

    monkeypatch.setattr(fused, "MAX_SIZE", 256)
    monkeypatch.setattr(fused, "MAX_THREE_STAGE_SIZE", 2048)
    assert fused.supports(1024, False) and fused.supports(1024, True) and not fused.supports(1025, False)
    cases = [((1, 2, 150), torch.float32, False), ((1, 1, 600), torch.float32, True), ((1, 2, 129), torch.float16, True),
             ((1, 1, 1500), torch.float32, False)]
    for shape, dtype, bidirectional in cases:
        tensors = _inputs(shape, dtype, bidirectional, kernel.device)
        y = _run("triton", *tensors, bidirectional)
        ref = _reference(tensors, bidirectional)
        what = f"{shape} {dtype} bidirectional={bidirectional}"
        if dtype == torch.float32:
            assert_close(y, ref, dtype, what)
        else:
            assert_as_accurate_as_reference(y, ref, _reference(tensors, bidirectional, dtype), dtype, what)
    # The backward's correlation through the three-stage path.
    leaves = [t.requires_grad_() for t in _inputs((1, 2, 150), torch.float32, True, kernel.device)]
    grad_out = signal(1, 2, 150, seed=9)
    grads = torch.autograd.grad(_run("triton", *leaves, True), leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    u, k, D, pre, post = ref_leaves
    ref = reference.fft_conv(u, k, D, bidirectional=True, pregate=pre, postgate=post)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, g, r in zip(("u", "k", "D", "pregate", "postgate"), grads, ref_grads):
        assert_close(g, r, torch.float32, f"three-stage grad {name}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_match_reference(kernel, bidirectional):
    for shape in SHAPES[1:4]:
        leaves = [t.requires_grad_() for t in _inputs(shape, torch.float32, bidirectional, kernel.device)]
        grad_out = signal(*shape, seed=9).to(kernel.device)
        grads = torch.autograd.grad(_run(kernel.backend, *leaves, bidirectional), leaves, grad_out)
        ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
        ref = reference.fft_conv(ref_leaves[0], ref_leaves[1], ref_leaves[2], bidirectional=bidirectional,
                                 pregate=ref_leaves[3], postgate=ref_leaves[4])
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
        for name, g, r in zip(("u", "k", "D", "pregate", "postgate"), grads, ref_grads):
            assert_close(g, r, torch.float32, f"{kernel} grad {name} {shape} bidirectional={bidirectional}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_opcheck(kernel, bidirectional):
    tensors = [t.requires_grad_() for t in _inputs((1, 2, 13), torch.float32, bidirectional, kernel.device)]
    torch.library.opcheck(torch.ops.pyfast.ssm_fft_conv.default, (*tensors, bidirectional, kernel.backend))


def test_backend_choice(kernel):
    u = signal(1, 2, 5, dtype=torch.float16).to(kernel.device)
    with pyfast.use_backend(kernel.backend):
        assert pyfast.backend_for("ssm.fft_conv", u).backend == kernel.backend
    registered = registered_ops()["ssm.fft_conv"].dtypes
    assert registered["triton"] == (torch.float32, torch.float16, torch.bfloat16)
    if kernel.device.type == "cuda":  # auto: CUDA tensors take the fused kernel
        assert pyfast.backend_for("ssm.fft_conv", u).backend == "triton"
