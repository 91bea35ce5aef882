"""Random expert-MLP inputs shared by the expert-compute tests."""
import torch

from moe_inputs import random_experts
from pyfast.moe import activations


def expert_mlp_inputs(T, E, k, d, ffn, dtype, device, activation="swiglu", skew=True):
    """``(x, w_gate_up, w_down, weights, experts)``; weights scaled so activations stay O(1)."""
    x = torch.randn(T, d, dtype=torch.float64)
    w1 = torch.randn(E, activations.hidden_width(activation, ffn), d, dtype=torch.float64) / d**0.5
    w2 = torch.randn(E, d, ffn, dtype=torch.float64) / ffn**0.5
    weights = torch.rand(T, k, dtype=torch.float64) + 0.1
    experts = random_experts(T, E, k, skew=skew)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return to(x), to(w1), to(w2), to(weights), experts.to(device)
