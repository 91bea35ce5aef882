"""Router auxiliary losses: load_balancing_loss + 1e-3 * router_z_loss, forward and forward+backward.

Workloads: router logits (T, E) float32 with T = 4096 and 65536 (``--quick``: 4096), E = 128,
k = 8; the expert ids are the logits' top-k (int32). Every provider's loss (forward) or gradient
(forward+backward) is checked against the float64 reference before it is timed.

Bytes moved (the minimum traffic of a fused implementation):
  forward           T*E*4 (logits read once) + T*k*4 (expert ids read)
  forward+backward  3*T*E*4 (logits read by the forward and the backward, gradient written)
                    + T*k*4

Providers: pyfast (pyfast.moe), reference (pyfast.moe.reference), torch-native (`torch_native_losses`).
"""
import functools

import pytest
import torch

import pyfast
from pyfast.moe import reference

SUITE = "moe aux losses: load_balancing_loss + 1e-3 * router_z_loss"
Z_WEIGHT = 1e-3
SHAPES = [(4096, 128, 8), (65536, 128, 8)]  # (T, E, k)


def _cases():
    for T, E, k in SHAPES:
        yield pytest.param((T, E, k), marks=[pytest.mark.large] if T > 4096 else [], id=f"T{T}-E{E}-k{k}")


@functools.lru_cache(maxsize=1)
def setup(shape, dtype, device):
    """Seeded random router logits ``(T, E) dtype`` and their top-k expert ids ``(T, k) int32``."""
    T, E, k = shape
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    experts = logits.topk(k, dim=-1).indices.to(torch.int32)
    return logits, experts


def pyfast_losses(ops):
    return lambda logits, experts: ops.load_balancing_loss(logits, experts) + Z_WEIGHT * ops.router_z_loss(logits)


def torch_native_losses(logits, experts):
    """Plain torch: one softmax for the mean probabilities, a bincount of the expert ids for the
    routed fractions, logsumexp for the z-loss."""
    T, E = logits.shape
    fraction = torch.bincount(experts.reshape(-1), minlength=E).to(logits.dtype) / experts.numel()
    balance = E * torch.dot(fraction, logits.softmax(dim=-1).mean(dim=0))
    return balance + Z_WEIGHT * torch.logsumexp(logits, dim=-1).square().mean()


PROVIDERS = {
    "pyfast": pyfast_losses(pyfast.moe),
    "reference": pyfast_losses(reference),
    "torch-native": torch_native_losses,
}


def _forward(loss_fn, logits, experts):
    return lambda: loss_fn(logits, experts)


def _forward_backward(loss_fn, logits, experts):
    leaf = logits.detach().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(leaf, experts), leaf)[0]


PASSES = {"fwd": _forward, "fwd+bwd": _forward_backward}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", list(PASSES))
@pytest.mark.parametrize("shape", list(_cases()))
def test_aux_losses(measure, expect_close, device, shape, mode, provider):
    T, E, k = shape
    logits, experts = setup(shape, torch.float32, device)
    # The float64 reference of what is timed: the loss (fwd) or its gradient (fwd+bwd).
    expected = PASSES[mode](PROVIDERS["reference"], logits.double(), experts)()
    measure(
        PASSES[mode](PROVIDERS[provider], logits, experts),
        suite=SUITE,
        workload=f"{mode} T={T} E={E} k={k} float32",
        provider=provider,
        bytes_moved=(T * E * 4 if mode == "fwd" else 3 * T * E * 4) + T * k * 4,
        sizes={"T": T, "E": E, "k": k, "dtype": "float32", "pass": mode},
        check=expect_close(expected, 1e-5, f"{provider} aux losses {mode}"),
    )
