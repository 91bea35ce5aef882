"""torch.library.opcheck on every pyfast::moe_* op, and torch.compile(fullgraph=True) over a routing step."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close
from moe_inputs import random_experts
from pyfast.moe import reference


def sample_inputs(device, dtype, requires_grad, backend):
    """(op, args) for every MoE custom op, with random, odd-sized inputs."""
    T, E, k, d = 11, 8, 3, 5
    ops = torch.ops.pyfast
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.randn(T, E, dtype=dtype, device=device, requires_grad=requires_grad)
    temperature = torch.tensor(0.9, dtype=acc, device=device, requires_grad=requires_grad)
    bias = torch.randn(E, dtype=acc, device=device)
    experts = random_experts(T, E, k, device)
    counts, offsets, rows, assignment = ops.moe_route(experts, E, 2, 4, backend)
    x = torch.randn(T, d, dtype=dtype, device=device, requires_grad=requires_grad)
    y = torch.randn(assignment.shape[0], d, dtype=dtype, device=device, requires_grad=requires_grad)
    weights = torch.rand(T, k, dtype=acc, device=device, requires_grad=requires_grad)
    plain = lambda t: t.detach().clone()  # noqa: E731
    samples = [
        (ops.moe_topk_gating, (logits, k, True, temperature, True, None, backend)),
        (ops.moe_topk_gating, (logits, k, False, temperature, False, bias, backend)),
        (ops.moe_topk_gating_bwd, (torch.randn(T, k, dtype=dtype, device=device), plain(logits), experts, True, plain(temperature), True, backend)),
        (ops.moe_route, (experts, E, 0, 0, backend)),
        (ops.moe_route, (experts, E, 2, 4, backend)),
        (ops.moe_gather_rows, (x, assignment, rows, None, backend)),
        (ops.moe_gather_rows, (x, assignment, rows, weights.reshape(-1), backend)),
        (ops.moe_combine_rows, (y, rows, assignment, weights, backend)),
        (ops.moe_combine_rows, (y, rows, assignment, None, backend)),
        (ops.moe_combine_weights_grad, (plain(x), plain(y), rows, backend)),
        (ops.moe_router_z_loss, (logits, backend)),
        (ops.moe_router_z_loss_bwd, (torch.tensor(1.5, dtype=acc, device=device), plain(logits), backend)),
    ]
    if backend == "cpu":  # the load-balancing loss runs the reference on the CPU
        return samples
    return samples + [
        (ops.moe_load_balancing_loss, (logits, experts, True, backend)),
        (ops.moe_load_balancing_loss_bwd, (torch.tensor(1.5, dtype=acc, device=device), plain(logits), experts, True, backend)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kernel, requires_grad):
    dtype = torch.float64 if torch.float64 in kernel.dtypes else torch.float32
    for op, args in sample_inputs(kernel.device, dtype, requires_grad, kernel.backend):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_opcheck_cuda_route():
    experts = random_experts(11, 8, 3, torch.device("cuda"))
    for capacity, align in ((0, 0), (2, 4)):
        torch.library.opcheck(torch.ops.pyfast.moe_route, (experts, 8, capacity, align, "cuda"))


def _routing_step(logits, x, temperature):
    weights, experts = pyfast.moe.topk_gating(logits, 2, temperature=temperature)
    x_sorted, routing = pyfast.moe.permute(x, experts, logits.shape[1], capacity=40, align=8)
    # A row-dependent expert function, so the output depends on the gate weights.
    expert_scale = torch.linspace(0.5, 1.5, x_sorted.shape[0], dtype=x.dtype, device=x.device)
    out = pyfast.moe.unpermute(torch.tanh(x_sorted) * expert_scale[:, None], weights, routing)
    aux = pyfast.moe.load_balancing_loss(logits, experts) + pyfast.moe.router_z_loss(logits)
    return out, aux


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_routing_step(kernel, compiler):
    if kernel.interpreted and compiler == "inductor":
        pytest.skip("inductor on the Triton interpreter is out of scope")
    torch._dynamo.reset()
    logits = torch.randn(64, 8, device=kernel.device, requires_grad=True)
    x = torch.randn(64, 24, device=kernel.device, requires_grad=True)
    temperature = torch.tensor(1.2, device=kernel.device, requires_grad=True)
    # auto on CPU tensors: C++ kernels for the routing, the reference for the aux losses.
    with pyfast.use_backend("auto" if kernel.backend == "cpu" else kernel.backend):
        compiled = torch.compile(_routing_step, fullgraph=True, backend=compiler)
        out, aux = compiled(logits, x, temperature)
        grads = torch.autograd.grad(out.square().sum() + aux, (logits, x, temperature))
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in (logits, x, temperature)]
    with pyfast.use_backend("reference"):
        ref_out, ref_aux = _routing_step(*ref_inputs)
        ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_aux, ref_inputs)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(aux, ref_aux, torch.float32, "aux")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad")


def test_reference_path_compiles_fullgraph():
    torch._dynamo.reset()
    logits = torch.randn(32, 8)
    x = torch.randn(32, 16)
    with pyfast.use_backend("reference"):
        out, aux = torch.compile(_routing_step, fullgraph=True, backend="aot_eager")(logits, x, 1.0)
        ref_out, ref_aux = _routing_step(logits, x, 1.0)
    assert_close(out, ref_out, torch.float32)
    assert reference is pyfast.moe.reference
