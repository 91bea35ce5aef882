"""The whole sparse MoE layer, routing to combine: topk_gating + the expert MLPs + weighted combine,
forward and forward+backward.

Shapes (name: E experts, k, d, expert ffn), SwiGLU experts, router logits float32:

  mixtral            E=8   k=2  d=4096 ffn=14336
  deepseek-v2-lite   E=64  k=6  d=2048 ffn=1408
  qwen3-30b-a3b      E=128 k=8  d=2048 ffn=768

CUDA: every shape at T = 1, 16, 512, 4096, 16384 in bfloat16 (T >= 4096 marked large).
CPU (2 cores in CI): the issue's CPU target, deepseek-v2-lite at T = 512 in float32 (large), and
with ``--quick`` the same routing (E=64, k=6) at a quarter of the width (d=512, ffn=352) at T = 1,
16 (decode) and 512.
Every provider's forward output is checked against the reference before it is timed.

Bytes moved (the weight-read floor that decides small-T speed), s = bytes per element:
  (touched experts) * 3 * d * ffn * s  +  2 * T * d * s  (x read, output written);
touched experts = min(E, T * k). ``sizes["gflop"]`` gives the GEMM FLOPs (2 * T * k * 3 * d * ffn,
tripled for forward+backward) for the compute floor.

Providers:
  pyfast        pyfast.moe.topk_gating + pyfast.moe.moe_mlp
  reference     pyfast.moe.reference (the loop over experts)
  torch-native  top-k softmax, argsort grouping, torch._grouped_mm for both GEMMs, index_add
                combine (only where torch has _grouped_mm)
"""
import functools

import pytest
import torch

import pyfast
from pyfast.moe import reference

SUITE = "moe layer: topk_gating + expert MLPs + combine"
MODELS = {
    "mixtral": (8, 2, 4096, 14336),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
QUICK_CPU = ("deepseek-v2-lite/4", (64, 6, 512, 352))
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _cases():
    if not torch.cuda.is_available():
        for T in (1, 16, 512):
            yield pytest.param(QUICK_CPU, T, torch.float32, id=f"{QUICK_CPU[0]}-T{T}-float32")
        yield pytest.param(("deepseek-v2-lite", MODELS["deepseek-v2-lite"]), 512, torch.float32,
                           marks=pytest.mark.large, id="deepseek-v2-lite-T512-float32")
        return
    for name, shape in MODELS.items():
        for T in (1, 16, 512, 4096, 16384):
            marks = [pytest.mark.large] if T >= 4096 else []
            yield pytest.param((name, shape), T, torch.bfloat16, marks=marks, id=f"{name}-T{T}-bfloat16")


@functools.lru_cache(maxsize=1)  # the providers of one workload share the inputs
def setup(model, T, dtype, device):
    """Seeded ``(logits (T, E) float32, x (T, d), w_gate_up (E, 2 ffn, d), w_down (E, d, ffn))``."""
    _, (E, _, d, ffn) = model
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)  # noqa: E731
    return make(T, E).float(), make(T, d), make(E, 2 * ffn, d, scale=d**-0.5), make(E, d, ffn, scale=ffn**-0.5)


@functools.lru_cache(maxsize=1)
def expected(model, T, dtype, device):
    """Float64 reference forward output of the workload."""
    logits, x, w1, w2 = setup(model, T, dtype, device)
    k = model[1][1]
    weights, experts = reference.topk_gating(logits.double(), k)
    return reference.moe_mlp(x.double(), w1.double(), w2.double(), weights, experts)


def layer(ops, logits, x, w1, w2, k):
    weights, experts = ops.topk_gating(logits, k)
    return ops.moe_mlp(x, w1, w2, weights, experts)


def torch_native_layer(logits, x, w1, w2, k):
    """Plain torch with grouped GEMMs: renormalized top-k softmax as softmax of the top-k logits,
    a stable argsort of the expert ids groups the rows, torch._grouped_mm runs both GEMMs (offsets
    = cumulative counts), index_add sums the gate-weighted rows back per token."""
    E, ffn = w1.shape[0], w2.shape[2]
    top, experts = logits.topk(k, dim=-1)
    weights = top.softmax(dim=-1)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    ends = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    x_sorted = x.index_select(0, order // k)
    h = torch._grouped_mm(x_sorted, w1.transpose(1, 2), offs=ends)
    a = torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=ends)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // k, y)


PROVIDERS = {
    "pyfast": functools.partial(layer, pyfast.moe),
    "reference": functools.partial(layer, reference),
}
if hasattr(torch, "_grouped_mm"):
    PROVIDERS["torch-native"] = torch_native_layer


def _bytes_moved(model, T, dtype) -> int:
    _, (E, k, d, ffn) = model
    s = torch.empty((), dtype=dtype).element_size()
    return min(E, T * k) * 3 * d * ffn * s + 2 * T * d * s


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("model,T,dtype", list(_cases()))
def test_moe_layer(measure, expect_close, device, model, T, dtype, backward, provider):
    name, (E, k, d, ffn) = model
    logits, x, w1, w2 = setup(model, T, dtype, device)
    fn = PROVIDERS[provider]
    if backward:
        leaves = [t.detach().requires_grad_() for t in (logits, x, w1, w2)]
        grad_out = torch.ones_like(x)

        def run():
            out = fn(*leaves, k)
            return (out, *torch.autograd.grad(out, leaves, grad_out))
    else:
        def run():
            with torch.no_grad():
                return fn(logits, x, w1, w2, k)

    mode = "forward+backward" if backward else "forward"
    measure(
        run,
        suite=f"{SUITE} ({mode})",
        workload=f"{name} T={T} E={E} k={k} d={d} ffn={ffn} {str(dtype).replace('torch.', '')}",
        provider=provider,
        bytes_moved=_bytes_moved(model, T, dtype),
        sizes={"T": T, "E": E, "k": k, "d": d, "ffn": ffn, "dtype": str(dtype),
               "gflop": 2 * T * k * 3 * d * ffn * (3 if backward else 1) / 1e9},
        check=expect_close(expected(model, T, dtype, device), TOLERANCE[dtype], f"{provider} {mode} output"),
    )
