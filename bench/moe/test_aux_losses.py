"""Router auxiliary losses, forward + backward: load_balancing_loss + router_z_loss.

Bytes moved: logits read twice (forward, backward) and the gradient written once: 3*T*E*4, plus
the expert ids T*k*4 read twice.
"""
import pytest
import torch

import pyfast
from pyfast.moe import reference
from bench_utils import QUICK, measure

CASES = [(4096, 128, 8)] if QUICK else [(4096, 128, 8), (65536, 128, 8)]


def aux_step(ops, logits, experts):
    loss = ops.load_balancing_loss(logits, experts) + 1e-3 * ops.router_z_loss(logits)
    return torch.autograd.grad(loss, logits)


def torch_native_step(logits, experts):
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros(E, device=logits.device).index_add_(0, experts.reshape(-1).long(), torch.ones(experts.numel(), device=logits.device))
    loss = E * (counts / experts.numel() * probs.mean(0)).sum() + 1e-3 * torch.logsumexp(logits, -1).square().mean()
    return torch.autograd.grad(loss, logits)


PROVIDERS = {
    "pyfast": lambda lg, e: aux_step(pyfast.moe, lg, e),
    "reference": lambda lg, e: aux_step(reference, lg, e),
    "torch-native": torch_native_step,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("T,E,k", CASES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in CASES])
def test_aux_losses(benchmark, device, provider, T, E, k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen).to(device).requires_grad_()
    experts = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(torch.int32).to(device)
    fn = PROVIDERS[provider]
    measure(
        benchmark, lambda: fn(logits, experts), workload=f"moe aux losses fwd+bwd T={T} E={E} k={k}",
        provider=provider, bytes_moved=3 * T * E * 4 + 2 * T * k * 4, device=device,
    )
