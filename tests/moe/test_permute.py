"""permute / unpermute kernels against the reference: values, gradients, layouts, strides."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close
from pyfast.moe import reference
from moe_inputs import random_experts

# (T, E, k, d): d of 1, primes and non-multiples of vector widths and blocks.
SHAPES = [(0, 8, 2, 16), (1, 1, 1, 1), (7, 8, 2, 3), (7, 60, 5, 130), (31, 257, 16, 33), (4099, 8, 2, 67), (1031, 60, 8, 256)]
SMALL_SHAPES = [s for s in SHAPES if s[0] * s[2] * s[3] < 30000]
LIMITS = [(None, None), (2, None), (None, 16), (3, 8)]


def _inputs(T, E, k, d, dtype, device, capacity, align):
    x = torch.randn(T, d, dtype=torch.float64).to(dtype).to(device)
    experts = random_experts(T, E, k, device, skew=True)
    weights = torch.rand(T, k, dtype=torch.float64).to(dtype).to(device) + 0.1
    return x, experts, weights


@pytest.mark.parametrize("capacity,align", LIMITS)
def test_permute_unpermute_match_reference(kernel, capacity, align):
    for T, E, k, d in SMALL_SHAPES if kernel.interpreted else SHAPES:
        for dtype in kernel.dtypes:
            x, experts, weights = _inputs(T, E, k, d, dtype, kernel.device, capacity, align)
            with pyfast.use_backend(kernel.backend):
                x_sorted, routing = pyfast.moe.permute(x, experts, E, capacity=capacity, align=align)
                y_sorted = x_sorted * 1.5
                out = pyfast.moe.unpermute(y_sorted, weights, routing)
            ref_sorted, ref_routing = reference.permute(x.cpu(), experts.cpu(), E, capacity=capacity, align=align)
            what = f"T={T} E={E} k={k} d={d} {dtype}"
            assert torch.equal(x_sorted.cpu(), ref_sorted), what  # pure data movement: bit-exact
            ref_out = reference.unpermute(ref_sorted.double() * 1.5, weights.cpu().double(), ref_routing)
            assert out.dtype == dtype
            assert_close(out, ref_out, dtype, what)


def test_padding_rows_are_zero_and_unused_rows_written(kernel):
    x = torch.randn(50, 9, device=kernel.device) + 3.0
    experts = random_experts(50, 8, 2, kernel.device, skew=True)
    with pyfast.use_backend(kernel.backend):
        x_sorted, routing = pyfast.moe.permute(x, experts, 8, capacity=6, align=16)
    unused = routing.assignment_of_row.cpu() < 0
    assert unused.any()
    assert (x_sorted.cpu()[unused] == 0).all()


@pytest.mark.parametrize("capacity,align", [(None, None), (3, 8)])
def test_gradients_match_reference(kernel, capacity, align):
    T, E, k, d = (13, 8, 2, 5) if kernel.interpreted else (301, 60, 6, 37)
    for dtype in (dt for dt in kernel.dtypes if dt in (torch.float64, torch.float32)):
        x, experts, weights = _inputs(T, E, k, d, dtype, kernel.device, capacity, align)
        w_sorted = torch.randn(num := pyfast.moe.num_rows(T, k, E, capacity, align), d, dtype=dtype, device=kernel.device)
        grad_out = torch.randn(T, d, dtype=dtype, device=kernel.device)

        def run(mod, x, w):
            x_sorted, routing = mod.permute(x, experts.to(x.device), E, capacity=capacity, align=align)
            out = mod.unpermute(x_sorted * w_sorted.to(x.device), w, routing)
            return torch.autograd.grad((out * grad_out.to(x.device)).sum(), (x, w))

        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        with pyfast.use_backend(kernel.backend):
            gx, gw = run(pyfast.moe, xg, wg)
        xr, wr = x.cpu().double().requires_grad_(), weights.cpu().double().requires_grad_()
        rx, rw = run(reference, xr, wr)
        assert num == w_sorted.shape[0]
        assert_close(gx, rx, dtype, "grad x")
        assert_close(gw, rw, dtype, "grad weights")


def test_mixed_weight_dtype(kernel):
    """float32 gate weights with half activations: combine in float32, output in the activation dtype."""
    half = next((d for d in kernel.dtypes if d in (torch.float16, torch.bfloat16)), None)
    if half is None:
        pytest.skip("no half dtype on this backend")
    x, experts, weights = _inputs(40, 8, 2, 24, half, kernel.device, None, None)
    weights = weights.float()
    with pyfast.use_backend(kernel.backend):
        x_sorted, routing = pyfast.moe.permute(x, experts, 8)
        out = pyfast.moe.unpermute(x_sorted, weights, routing)
    ref_sorted, ref_routing = reference.permute(x.cpu().double(), experts.cpu(), 8)
    assert out.dtype == half
    assert_close(out, reference.unpermute(ref_sorted, weights.cpu().double(), ref_routing), half)


def test_non_contiguous_inputs(kernel):
    wide = torch.randn(40, 50, device=kernel.device)
    x = wide[:, 5:29]  # row stride 50
    experts = random_experts(40, 8, 2, kernel.device)
    weights = torch.rand(2, 40, device=kernel.device).t()  # column-major
    with pyfast.use_backend(kernel.backend):
        x_sorted, routing = pyfast.moe.permute(x, experts, 8)
        y = torch.randn(x_sorted.shape[1], x_sorted.shape[0], device=kernel.device).t()  # column-major
        out = pyfast.moe.unpermute(y, weights, routing)
    ref_sorted, ref_routing = reference.permute(x.cpu().double(), experts.cpu(), 8)
    assert torch.equal(x_sorted.cpu().double(), ref_sorted)
    assert_close(out, reference.unpermute(y.cpu().double(), weights.cpu().double(), ref_routing), torch.float32)


@pytest.mark.parametrize("capacity,align", [(None, None), (2, 4)])
def test_reference_gradcheck(capacity, align):
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    experts = random_experts(9, 5, 3)

    def step(x, w):
        x_sorted, routing = reference.permute(x, experts, 5, capacity=capacity, align=align)
        return reference.unpermute(x_sorted.sin(), w, routing)

    assert torch.autograd.gradcheck(step, (x, weights))
