"""The expert-compute reference (grouped_mm, moe_mlp, activations) against independent dense
formulations, and its float64 gradients."""
import pytest
import torch

from moe_inputs import random_experts
from pyfast.moe import activations, reference


def _dense_moe(x, w1, w2, weights, experts, activation, kept):
    """Every expert on every token, then a masked weighted sum: an independent formulation."""
    hidden = torch.einsum("td,ehd->teh", x, w1)
    y = torch.einsum("tef,edf->ted", activations.apply(hidden, activation), w2)  # (T, E, d)
    gate = torch.zeros(x.shape[0], w1.shape[0], dtype=x.dtype)
    gate.scatter_add_(1, experts.long(), torch.where(kept, weights, torch.zeros_like(weights)))
    return torch.einsum("te,ted->td", gate, y)


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("capacity", [None, 2])
def test_moe_mlp_matches_dense_formulation(activation, capacity):
    T, E, k, d, ffn = 13, 5, 2, 7, 6
    x = torch.randn(T, d, dtype=torch.float64)
    w1 = torch.randn(E, activations.hidden_width(activation, ffn), d, dtype=torch.float64)
    w2 = torch.randn(E, d, ffn, dtype=torch.float64)
    weights = torch.rand(T, k, dtype=torch.float64)
    experts = random_experts(T, E, k, skew=True)
    kept = reference.route(experts, E, capacity=capacity).row_of_assignment >= 0
    assert capacity is None or not kept.all()
    out = reference.moe_mlp(x, w1, w2, weights, experts, activation=activation, capacity=capacity)
    torch.testing.assert_close(out, _dense_moe(x, w1, w2, weights, experts, activation, kept))


@pytest.mark.parametrize("align", [None, 4])
def test_grouped_mm_matches_per_row_products(align):
    T, E, k, d, n = 9, 6, 2, 5, 3
    experts = random_experts(T, E, k, skew=True)
    x = torch.randn(T, d, dtype=torch.float64)
    x_sorted, routing = reference.permute(x, experts, E, align=align)
    w = torch.randn(E, n, d, dtype=torch.float64)
    out = reference.grouped_mm(x_sorted, w, routing)
    token = routing.token_of_row
    assignment = routing.assignment_of_row
    for r in range(x_sorted.shape[0]):
        if assignment[r] < 0:
            assert (out[r] == 0).all()
        else:
            e = experts.reshape(-1)[assignment[r]]
            torch.testing.assert_close(out[r], w[e] @ x[token[r]])


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_activation_backward_matches_autograd(activation):
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    grad_a = torch.randn(7, 5 if activations.is_gated(activation) else 10, dtype=torch.float64)
    (expected,) = torch.autograd.grad(activations.apply(h, activation), h, grad_a)
    torch.testing.assert_close(activations.backward(h.detach(), grad_a, activation), expected)


def test_reference_gradcheck():
    T, E, k, d, ffn = 6, 4, 2, 3, 2
    experts = random_experts(T, E, k)
    inputs = (
        torch.randn(T, d, dtype=torch.float64, requires_grad=True),
        torch.randn(E, 2 * ffn, d, dtype=torch.float64, requires_grad=True),
        torch.randn(E, d, ffn, dtype=torch.float64, requires_grad=True),
        torch.rand(T, k, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda *a: reference.moe_mlp(*a, experts, capacity=2), inputs)
    x_sorted, routing = reference.permute(inputs[0].detach(), experts, E, align=3)
    w = torch.randn(E, 4, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: reference.grouped_mm(a, b, routing), (x_sorted.requires_grad_(), w))
