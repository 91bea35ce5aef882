"""Expert MLP activations in plain torch: forward and the backward the kernels implement.

Gated activations (``swiglu``, ``geglu``) read ``h = [gate | up]`` of width ``2 * ffn`` (the gate
half first, as Mixtral's ``w1`` / ``w3`` stacked) and return ``act(gate) * up`` of width ``ffn``;
the plain ones (``silu``, ``gelu``, ``relu``) map ``h`` of width ``ffn`` elementwise. GELU is the
exact (erf) form.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

GATED = {"swiglu": "silu", "geglu": "gelu"}
ACTIVATIONS = ("swiglu", "geglu", "silu", "gelu", "relu")


def is_gated(activation: str) -> bool:
    return activation in GATED


def hidden_width(activation: str, ffn: int) -> int:
    """Width of the first GEMM's output for an expert MLP with ``ffn`` hidden units."""
    return 2 * ffn if is_gated(activation) else ffn


def _unary(name: str, z: Tensor) -> Tensor:
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    return torch.relu(z)


def _unary_grad(name: str, z: Tensor) -> Tensor:
    """Elementwise derivative of the unary activation at ``z``."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":
        # d/dz z Phi(z) = Phi(z) + z phi(z)
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    return (z > 0).to(z.dtype)


def apply(h: Tensor, activation: str) -> Tensor:
    """``(rows, ffn)`` activation of the first GEMM's output ``h`` (see module docstring)."""
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        act = _unary(GATED[activation], gate)
        # act is fresh: multiply in place (one (rows, ffn) buffer less) unless autograd records it
        return act * up if act.requires_grad else act.mul_(up)
    return _unary(activation, h)


def backward(h: Tensor, grad_a: Tensor, activation: str) -> Tensor:
    """Gradient w.r.t. ``h`` given the gradient ``grad_a`` of ``apply(h, activation)``."""
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        name = GATED[activation]
        return torch.cat([grad_a * up * _unary_grad(name, gate), grad_a * _unary(name, gate)], dim=-1)
    return grad_a * _unary_grad(activation, h)
