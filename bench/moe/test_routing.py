"""The routing step of an MoE layer: topk_gating + permute + unpermute (identity experts).

Workloads: T = 4096 and 65536 tokens, d = 2048, (E, k) = (8, 2) Mixtral-like and (128, 8)
Qwen3-MoE-like; x in bfloat16 (and float32 on the CPU), router logits in float32.

Bytes moved (the memory floor's numerator): logits read T*E*4, x read T*d*s, x_sorted written and
read back 2*R*d*s, output written T*d*s, plus the index arrays (experts T*k*4, weights T*k*4,
row_of_assignment T*k*8, assignment_of_row R*8); s = bytes per element, R = T*k.
"""
import pytest
import torch

import pyfast
from pyfast.moe import reference
from bench_utils import FULL, QUICK, bench_device, measure

CASES = [(4096, 8, 2), (4096, 128, 8), (65536, 8, 2), (65536, 128, 8)]
D = 2048


def _cases():
    cpu = bench_device().type == "cpu"
    for T, E, k in CASES:
        if QUICK and T > 4096:
            continue
        if cpu and not FULL and T * k > 65536 * 2:
            continue  # ~11 GB of reference temporaries on the CPU: PYFAST_BENCH_FULL=1 to run it
        for dtype in (torch.bfloat16, torch.float32) if cpu else (torch.bfloat16,):
            if dtype == torch.float32 and T > 4096:
                continue
            yield pytest.param(T, E, k, dtype, id=f"T{T}-E{E}-k{k}-{str(dtype).replace('torch.', '')}")


def setup(T, E, k, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=gen).to(device)
    x = torch.randn(T, D, generator=gen).to(dtype).to(device)
    return logits, x


def bytes_moved(T, E, k, dtype):
    s = torch.empty((), dtype=dtype).element_size()
    R = T * k
    return T * E * 4 + T * D * s + 2 * R * D * s + T * D * s + T * k * (4 + 4 + 8) + R * 8


def routing_step(ops, logits, x, k, E):
    weights, experts = ops.topk_gating(logits, k)
    x_sorted, routing = ops.permute(x, experts, E)
    return ops.unpermute(x_sorted, weights, routing)


def torch_native_step(logits, x, k, E):
    """The fastest plain-torch routing step we know: topk on probabilities, a stable argsort of
    the expert ids, index_select into the grouped layout, scatter back and a weighted sum."""
    T, d = x.shape
    weights, experts = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    order = experts.reshape(-1).argsort(stable=True)
    x_sorted = x.index_select(0, order // k)
    y = torch.empty_like(x_sorted)
    y[order] = x_sorted  # identity experts; back to (token, slot) order
    return torch.bmm(weights.to(x.dtype).unsqueeze(1), y.view(T, k, d)).squeeze(1)


PROVIDERS = {
    "pyfast": lambda logits, x, k, E: routing_step(pyfast.moe, logits, x, k, E),
    "reference": lambda logits, x, k, E: routing_step(reference, logits, x, k, E),
    "torch-native": torch_native_step,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("T,E,k,dtype", list(_cases()))
def test_routing_step(benchmark, device, provider, T, E, k, dtype):
    logits, x = setup(T, E, k, dtype, device)
    fn = PROVIDERS[provider]
    rounds = 2 if provider == "reference" and T > 4096 else None
    measure(
        benchmark, lambda: fn(logits, x, k, E), workload=f"moe routing T={T} E={E} k={k} d={D} {str(dtype)[6:]}",
        provider=provider, bytes_moved=bytes_moved(T, E, k, dtype), device=device, rounds=rounds,
    )
