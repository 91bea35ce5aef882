"""The routing step of an MoE layer, forward: topk_gating + permute + unpermute.

The experts are the identity (``y_sorted = x_sorted``), so the step measures exactly the routing
work around the expert GEMMs, and its output must equal ``x`` (softmax top-k weights renormalized
to sum to 1); every provider's output is checked against ``x`` before it is timed.

Workloads: T = 4096 and 65536 tokens, d = 2048, (E, k) = (8, 2) (Mixtral-like) and (128, 8)
(Qwen3-MoE-like); router logits (T, E) float32; x (T, d) bfloat16, and float32 on the CPU at
T = 4096. ``--quick`` keeps T = 4096. (On the CPU, T = 65536 with k = 8 moves 4.9 GB per call:
those cases get the minimum of 3 rounds.)

Bytes moved (numerator of the memory floor and of the achieved GB/s), s = bytes per element of x,
R = T * k rows of the grouped layout:

    T*E*4            router logits read
  + T*d*s            x read (gather)
  + 2*R*d*s          x_sorted written, then read back by unpermute (y_sorted = x_sorted)
  + T*d*s            output written
  + T*k*(4 + 4 + 8)  experts (int32), weights (float32), row of each assignment (int64)
  + R*8              assignment of each row (int64)

Each index array is counted once (written by one step; its re-read is small and mostly cached).

Providers:
  pyfast        pyfast.moe.topk_gating / permute / unpermute
  reference     pyfast.moe.reference, the plain-torch specification
  torch-native  the fastest plain-torch step we know (`torch_native_step`)
"""
import functools

import pytest
import torch

import pyfast
from pyfast.moe import reference

SUITE = "moe routing step: topk_gating + permute + unpermute (forward)"
D = 2048
SHAPES = [(4096, 8, 2), (4096, 128, 8), (65536, 8, 2), (65536, 128, 8)]  # (T, E, k)
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _cases():
    for T, E, k in SHAPES:
        # float32 is a CPU-only extra, at T = 4096: at T = 65536, k = 8 it would move 8.6 GB per
        # call and the reference would peak at ~15 GB of host memory.
        for dtype in (torch.bfloat16, torch.float32) if T <= 4096 else (torch.bfloat16,):
            marks = ([pytest.mark.large] if T > 4096 else []) + ([pytest.mark.cpu_only] if dtype == torch.float32 else [])
            yield pytest.param((T, E, k), dtype, marks=marks, id=f"T{T}-E{E}-k{k}-{_name(dtype)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=1)  # the providers of one workload share the inputs
def setup(shape, dtype, device):
    """Seeded random inputs: ``(logits (T, E) float32, x (T, d) dtype)`` on ``device``."""
    T, E, _ = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen).to(device)
    x = torch.randn(T, D, generator=gen).to(dtype).to(device)
    return logits, x


def bytes_moved(shape, dtype) -> int:
    T, E, k = shape
    s = torch.empty((), dtype=dtype).element_size()
    R = T * k
    return T * E * 4 + T * D * s + 2 * R * D * s + T * D * s + T * k * (4 + 4 + 8) + R * 8


def routing_step(ops, logits, x, k, E):
    weights, experts = ops.topk_gating(logits, k)
    x_sorted, routing = ops.permute(x, experts, E)
    return ops.unpermute(x_sorted, weights, routing)  # identity experts: y_sorted = x_sorted


def torch_native_step(logits, x, k, E):
    """Plain torch, written for speed:

    - gating: top-k of the logits, then a softmax over those k values. Softmax is monotone, and
      ``softmax(z)[top] / sum(softmax(z)[top]) == softmax(z[top])``, so this equals the
      renormalized top-k softmax without computing all E probabilities;
    - permute: a stable argsort of the flat expert ids groups the T*k assignments by expert;
      ``index_select`` gathers the rows;
    - unpermute: the inverse permutation (a scatter of T*k ints) and one ``index_select`` restore
      (token, slot) order; the weighted sum over k is a batched (1 x k) @ (k x d) product
      (``bmm``), or multiply + sum for 16-bit floats on the CPU, where that measured faster.
    """
    T, d = x.shape
    top, experts = logits.topk(k, dim=-1)
    weights = top.softmax(dim=-1)
    order = experts.reshape(-1).argsort(stable=True)
    x_sorted = x.index_select(0, order // k)
    y_sorted = x_sorted
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted.index_select(0, inverse).view(T, k, d)
    w = weights.to(x.dtype)
    if x.device.type == "cpu" and x.element_size() == 2:
        return (y * w.unsqueeze(-1)).sum(dim=1)
    return torch.bmm(w.unsqueeze(1), y).squeeze(1)


PROVIDERS = {
    "pyfast": lambda logits, x, k, E: routing_step(pyfast.moe, logits, x, k, E),
    "reference": lambda logits, x, k, E: routing_step(reference, logits, x, k, E),
    "torch-native": torch_native_step,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape,dtype", list(_cases()))
def test_routing_step(measure, expect_close, device, shape, dtype, provider):
    T, E, k = shape
    logits, x = setup(shape, dtype, device)
    fn = PROVIDERS[provider]
    measure(
        lambda: fn(logits, x, k, E),
        suite=SUITE,
        workload=f"T={T} E={E} k={k} d={D} {_name(dtype)}",
        provider=provider,
        bytes_moved=bytes_moved(shape, dtype),
        sizes={"T": T, "E": E, "k": k, "d": D, "dtype": _name(dtype), "logits": "float32"},
        check=expect_close(x, TOLERANCE[dtype], f"{provider} routing step (identity experts must return x)"),
    )
