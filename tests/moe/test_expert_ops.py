"""grouped_mm and moe_mlp kernels against the reference: values, gradients, empty experts,
T = 0 / 1 / odd, capacity dropping, strides, opcheck, random shapes (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfast
from expert_inputs import expert_mlp_inputs
from kernel_cases import assert_as_accurate_as_reference, assert_close
from moe_inputs import random_experts
from pyfast.moe import reference

# (T, E, k, d, ffn): T = 0 and 1, E not a multiple of anything, E > T*k (empty experts), odd sizes.
SHAPES = [(0, 4, 2, 8, 6), (1, 1, 1, 1, 1), (1, 7, 3, 5, 4), (9, 31, 2, 12, 5), (37, 13, 3, 17, 10), (130, 6, 2, 33, 19)]
INTERPRETER_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3]]  # the interpreter runs each program in Python
ACTIVATIONS = ["swiglu", "geglu", "gelu", "relu", "silu"]


def _reference64(inputs, activation, capacity):
    x, w1, w2, weights, experts = (t.detach().cpu() for t in inputs)
    return reference.moe_mlp(
        x.double(), w1.double(), w2.double(), weights.double(), experts, activation=activation, capacity=capacity
    )


def _check_low_precision(out, inputs, activation, capacity, dtype, what):
    ref64 = _reference64(inputs, activation, capacity)
    if dtype in (torch.float64, torch.float32):
        assert_close(out, ref64, dtype, what)
    else:
        x, w1, w2, weights, experts = (t.cpu() for t in inputs)
        ref_low = reference.moe_mlp(x, w1, w2, weights, experts, activation=activation, capacity=capacity)
        assert_as_accurate_as_reference(out, ref64, ref_low, dtype, what)


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_mlp_matches_reference(kernel, activation, capacity):
    for T, E, k, d, ffn in INTERPRETER_SHAPES if kernel.interpreted else SHAPES:
        # Every dtype runs with the gated activations; the others share the dtype handling, float32 suffices.
        dtypes = kernel.dtypes if activation in ("swiglu", "geglu") else [torch.float32]
        for dtype in dtypes:
            inputs = expert_mlp_inputs(T, E, k, d, ffn, dtype, kernel.device, activation)
            with pyfast.use_backend(kernel.backend):
                out = pyfast.moe.moe_mlp(*inputs, activation=activation, capacity=capacity)
            assert out.dtype == dtype and out.shape == (T, d)
            _check_low_precision(out, inputs, activation, capacity, dtype, f"T={T} E={E} k={k} d={d} ffn={ffn} {dtype}")


@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_mlp_gradients_match_reference(kernel, activation, capacity):
    shapes = [(1, 5, 2, 3, 4), (11, 7, 2, 9, 5)] if kernel.interpreted else [(1, 5, 2, 3, 4), (61, 9, 3, 20, 13)]
    for T, E, k, d, ffn in shapes:
        for dtype in (dt for dt in kernel.dtypes if dt in (torch.float64, torch.float32)):
            inputs = expert_mlp_inputs(T, E, k, d, ffn, dtype, kernel.device, activation)
            experts = inputs[4]
            leaves = [t.clone().requires_grad_() for t in inputs[:4]]
            grad_out = torch.randn(T, d, dtype=dtype, device=kernel.device)
            with pyfast.use_backend(kernel.backend):
                out = pyfast.moe.moe_mlp(*leaves, experts, activation=activation, capacity=capacity)
            grads = torch.autograd.grad(out, leaves, grad_out)
            ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs[:4]]
            ref = reference.moe_mlp(*ref_leaves, experts.cpu(), activation=activation, capacity=capacity)
            ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
            for name, g, r in zip(("x", "w_gate_up", "w_down", "weights"), grads, ref_grads):
                assert g.dtype == dtype
                assert_close(g, r, dtype, f"grad {name} T={T} {dtype}")


def test_moe_mlp_half_gradients(kernel):
    """16-bit gradients: at most 2x the error of the reference run in that precision."""
    half = next((d for d in kernel.dtypes if d in (torch.float16, torch.bfloat16)), None)
    inputs = expert_mlp_inputs(23, 6, 2, 16, 12, half, kernel.device)
    grad_out = torch.randn(23, 16, dtype=torch.float64)

    def grads(module, tensors, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors[:4]]
        out = module.moe_mlp(*leaves, tensors[4], capacity=7)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype).to(out.device))

    with pyfast.use_backend(kernel.backend):
        got = grads(pyfast.moe, inputs, half)
    cpu_inputs = [t.cpu() for t in inputs]
    for g, r64, rlow in zip(got, grads(reference, cpu_inputs, torch.float64), grads(reference, cpu_inputs, half)):
        assert_as_accurate_as_reference(g, r64, rlow, half, "half grad")


@pytest.mark.parametrize("capacity,align", [(None, None), (2, None), (None, 8), (3, 4)])
def test_grouped_mm_matches_reference(kernel, capacity, align):
    shapes = [(0, 3, 2, 5, 4), (1, 1, 1, 1, 1), (7, 11, 2, 9, 6), (29, 5, 3, 17, 33)]
    for T, E, k, d, n in shapes:
        for dtype in kernel.dtypes:
            x = torch.randn(T, d, dtype=torch.float64).to(dtype).to(kernel.device)
            w = (torch.randn(E, n, d, dtype=torch.float64) / d**0.5).to(dtype).to(kernel.device)
            experts = random_experts(T, E, k, kernel.device, skew=True)
            with pyfast.use_backend(kernel.backend):
                x_sorted, routing = pyfast.moe.permute(x, experts, E, capacity=capacity, align=align)
                out = pyfast.moe.grouped_mm(x_sorted, w, routing)
            ref_sorted, ref_routing = reference.permute(x.cpu().double(), experts.cpu(), E, capacity=capacity, align=align)
            assert out.dtype == dtype
            assert_close(out, reference.grouped_mm(ref_sorted, w.cpu().double(), ref_routing), dtype, f"T={T} {dtype}")


@pytest.mark.parametrize("capacity,align", [(None, None), (3, 4)])
def test_grouped_mm_gradients_match_reference(kernel, capacity, align):
    T, E, k, d, n = (9, 5, 2, 6, 7) if kernel.interpreted else (83, 10, 3, 24, 19)
    for dtype in (dt for dt in kernel.dtypes if dt in (torch.float64, torch.float32)):
        experts = random_experts(T, E, k, kernel.device, skew=True)
        routing = reference.route(experts.cpu(), E, capacity=capacity, align=align)
        a = torch.randn(routing.assignment_of_row.shape[0], d, dtype=dtype)
        w = torch.randn(E, n, d, dtype=dtype)
        grad = torch.randn(a.shape[0], n, dtype=dtype)
        a_k, w_k = a.to(kernel.device).requires_grad_(), w.to(kernel.device).requires_grad_()
        with pyfast.use_backend(kernel.backend):
            kernel_routing = pyfast.moe.route(experts, E, capacity=capacity, align=align)
            out = pyfast.moe.grouped_mm(a_k, w_k, kernel_routing)
        got = torch.autograd.grad(out, (a_k, w_k), grad.to(kernel.device))
        a_r, w_r = a.double().requires_grad_(), w.double().requires_grad_()
        expected = torch.autograd.grad(reference.grouped_mm(a_r, w_r, routing), (a_r, w_r), grad.double())
        for name, g, r in zip(("x_sorted", "w"), got, expected):
            assert_close(g, r, dtype, f"grad {name} {dtype}")


def test_moe_mlp_non_contiguous_inputs(kernel):
    T, E, k, d, ffn = 21, 6, 2, 10, 7
    x, w1, w2, weights, experts = expert_mlp_inputs(T, E, k, d, ffn, torch.float32, kernel.device)
    x_strided = torch.cat([x, x], dim=1)[:, :d]  # row stride 2d
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # column-major experts
    weights_t = weights.t().contiguous().t()
    with pyfast.use_backend(kernel.backend):
        out = pyfast.moe.moe_mlp(x_strided, w1_t, w2, weights_t, experts.long())
    assert_close(out, _reference64((x, w1, w2, weights, experts), "swiglu", None), torch.float32)


def test_moe_mlp_float32_gates_with_half_activations(kernel):
    half = next((d for d in kernel.dtypes if d in (torch.float16, torch.bfloat16)), None)
    x, w1, w2, weights, experts = expert_mlp_inputs(30, 5, 2, 12, 8, half, kernel.device)
    with pyfast.use_backend(kernel.backend):
        out = pyfast.moe.moe_mlp(x, w1, w2, weights.float(), experts)
    assert out.dtype == half
    inputs = (x, w1, w2, weights, experts)
    x_, w1_, w2_, _, e_ = (t.cpu() for t in inputs)
    ref_low = reference.moe_mlp(x_, w1_, w2_, weights.cpu().float(), e_)
    assert_as_accurate_as_reference(out, _reference64(inputs, "swiglu", None), ref_low, half)


def sample_inputs(device, dtype, backend):
    """(op, args) for every expert-compute custom op, odd sizes, an empty expert, capacity drops."""
    T, E, k, d, ffn = 9, 6, 2, 5, 3
    ops = torch.ops.pyfast
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, w1, w2, weights, experts = expert_mlp_inputs(T, E, k, d, ffn, dtype, device)
    weights = weights.to(acc)
    counts, offsets, rows, assignment = ops.moe_route(experts.int(), E, 3, 0, backend)
    R = assignment.shape[0]
    a = torch.randn(R, d, dtype=dtype, device=device)
    hidden = torch.randn(R, 2 * ffn, dtype=dtype, device=device)
    routing = (rows, assignment, counts, offsets)
    grad_rows = torch.randn(R, 2 * ffn, dtype=dtype, device=device)
    return [
        (ops.moe_grouped_mm, (a, w1, counts, offsets, False, backend)),
        (ops.moe_grouped_mm, (grad_rows, w1, counts, offsets, True, backend)),
        (ops.moe_grouped_mm_wgrad, (grad_rows, a, counts, offsets, False, backend)),
        (ops.moe_mlp, (x, w1, w2, weights, *routing, "swiglu", backend)),
        (ops.moe_mlp_bwd, (torch.randn(T, d, dtype=dtype, device=device), x, w1, w2, weights, hidden, *routing, "swiglu", backend)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kernel, requires_grad):
    if kernel.interpreted and not requires_grad:
        pytest.skip("interpreter time: the requires_grad run covers schema, fake and dispatch checks too")
    dtype = torch.float64 if torch.float64 in kernel.dtypes else torch.float32
    for op, args in sample_inputs(kernel.device, dtype, kernel.backend):
        # Backward ops have no autograd formula of their own (no double backward).
        if requires_grad and op not in (torch.ops.pyfast.moe_grouped_mm_wgrad, torch.ops.pyfast.moe_mlp_bwd):
            args = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(op, args)


def test_reference_backend_runs_the_loop():
    inputs = expert_mlp_inputs(12, 4, 2, 6, 5, torch.float64, "cpu")
    with pyfast.use_backend("reference"):
        out = pyfast.moe.moe_mlp(*inputs)
    assert pyfast.backend_for("moe.moe_mlp", inputs[0]).backend == "cpu"
    torch.testing.assert_close(out, reference.moe_mlp(*inputs))


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_moe_mlp_random_shapes_cpu(data):
    E = data.draw(st.integers(1, 20), label="E")
    k = data.draw(st.integers(1, min(E, 4)), label="k")
    T, d, ffn = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("T", 0, 40), ("d", 1, 24), ("ffn", 1, 16)))
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="capacity")
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    inputs = expert_mlp_inputs(T, E, k, d, ffn, torch.float32, "cpu", activation, skew=data.draw(st.booleans()))
    with pyfast.use_backend("cpu"):
        out = pyfast.moe.moe_mlp(*inputs, activation=activation, capacity=capacity)
    assert_close(out, _reference64(inputs, activation, capacity), torch.float32)
