"""load_balancing_loss and router_z_loss kernels against the reference, with gradients."""
import pytest
import torch

import pyfast
from kernel_cases import KERNEL_PARAMS, assert_close, make_case
from moe_inputs import random_experts
from pyfast.moe import reference


@pytest.fixture(params=[p for p in KERNEL_PARAMS if p.id != "cpu"])
def gpu_kernel(request):
    """load_balancing_loss has no CPU kernel (torch's softmax and mean win there)."""
    return make_case(request.param)


SHAPES = [(0, 8, 2), (1, 1, 1), (7, 60, 5), (4099, 8, 2), (1031, 257, 16)]
SMALL_SHAPES = [s for s in SHAPES if s[0] * s[1] < 20000]


def _router(T, E, dtype, device, kind):
    logits = 2 * torch.randn(T, E, dtype=torch.float64)
    router = logits if kind == "logits" else torch.softmax(logits, dim=-1)
    return router.to(dtype).to(device)


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_load_balancing_loss(gpu_kernel, kind):
    kernel = gpu_kernel
    for T, E, k in SMALL_SHAPES if kernel.interpreted else SHAPES:
        for dtype in kernel.dtypes:
            router = _router(T, E, dtype, kernel.device, kind)
            experts = random_experts(T, E, k, kernel.device, skew=True)
            grad = torch.tensor(1.7)
            r = router.clone().requires_grad_()
            with pyfast.use_backend(kernel.backend):
                loss = pyfast.moe.load_balancing_loss(r, experts, input=kind)
                (g,) = torch.autograd.grad(loss * grad.to(loss), r)
            ref_r = router.cpu().double().requires_grad_()
            ref = reference.load_balancing_loss(ref_r, experts.cpu(), input=kind)
            (ref_g,) = torch.autograd.grad(ref * grad.double(), ref_r)
            what = f"T={T} E={E} k={k} {dtype}"
            assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert_close(loss, ref, torch.float32 if dtype != torch.float64 else dtype, what)
            assert_close(g, ref_g, dtype, what + " grad")


def test_router_z_loss(kernel):
    for T, E, _ in SMALL_SHAPES if kernel.interpreted else SHAPES:
        for dtype in kernel.dtypes:
            logits = _router(T, E, dtype, kernel.device, "logits") + 4.0
            lg = logits.clone().requires_grad_()
            with pyfast.use_backend(kernel.backend):
                loss = pyfast.moe.router_z_loss(lg)
                (g,) = torch.autograd.grad(loss * 0.3, lg)
            ref_lg = logits.cpu().double().requires_grad_()
            ref = reference.router_z_loss(ref_lg)
            (ref_g,) = torch.autograd.grad(ref * 0.3, ref_lg)
            what = f"T={T} E={E} {dtype}"
            assert_close(loss, ref, torch.float32 if dtype != torch.float64 else dtype, what)
            assert_close(g, ref_g, dtype, what + " grad")


def test_router_z_loss_row_strided(kernel):
    """Rows further apart than E (a column slice of wider logits) are read in place."""
    wide = 3 * torch.randn(37, 41, dtype=torch.float64)
    for dtype in kernel.dtypes:
        lg = wide.to(dtype).to(kernel.device)[:, 3:32].requires_grad_()
        assert lg.stride(0) == 41
        with pyfast.use_backend(kernel.backend):
            loss = pyfast.moe.router_z_loss(lg)
            (g,) = torch.autograd.grad(loss, lg)
        ref_lg = wide[:, 3:32].to(dtype).double().requires_grad_()
        ref = reference.router_z_loss(ref_lg)
        (ref_g,) = torch.autograd.grad(ref, ref_lg)
        assert_close(loss, ref, torch.float32 if dtype != torch.float64 else dtype, f"{dtype}")
        assert_close(g, ref_g, dtype, f"{dtype} grad")


def test_uniform_routing_gives_unit_balance_loss():
    T, E, k = 64, 8, 2
    experts = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    loss = pyfast.moe.load_balancing_loss(torch.zeros(T, E) + torch.randn(T, 1), experts)
    assert torch.allclose(loss, torch.tensor(1.0))


def test_reference_gradcheck():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    experts = random_experts(7, 5, 2)
    assert torch.autograd.gradcheck(lambda lg: reference.load_balancing_loss(lg, experts), (logits,))
    assert torch.autograd.gradcheck(reference.router_z_loss, (logits,))
