"""The decode path of moe_mlp (T < 64 tokens: one fused kernel, each touched expert's weights read
once) against the reference; the grouped path stays covered at the same small sizes."""
import pytest
import torch

import pyfast
from expert_inputs import expert_mlp_inputs
from kernel_cases import assert_as_accurate_as_reference, assert_close, make_case
from pyfast.moe import reference

pytestmark = pytest.mark.triton

# (T, E, k, d, ffn): one token, odd sizes, more rows per expert than one 16-row tile (T * k = 34
# rows over 3 experts), empty experts (E > T * k), T = 0.
SHAPES = [(1, 5, 2, 7, 6), (3, 9, 2, 20, 17), (17, 3, 2, 9, 5), (0, 4, 2, 8, 6)]


@pytest.fixture
def triton_case():
    return make_case("triton")


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_decode_matches_reference(triton_case, activation):
    from pyfast.triton_kernels.moe import decode

    for T, E, k, d, ffn in SHAPES:
        assert T < decode.DECODE_MAX_TOKENS
        for dtype in triton_case.dtypes:
            inputs = expert_mlp_inputs(T, E, k, d, ffn, dtype, triton_case.device, activation)
            with pyfast.use_backend("triton"):
                out = pyfast.moe.moe_mlp(*inputs, activation=activation)
            x, w1, w2, weights, experts = (t.cpu() for t in inputs)
            ref64 = reference.moe_mlp(x.double(), w1.double(), w2.double(), weights.double(), experts, activation=activation)
            what = f"T={T} E={E} k={k} d={d} ffn={ffn} {dtype}"
            if dtype == torch.float32:
                assert_close(out, ref64, dtype, what)
            else:
                ref_low = reference.moe_mlp(x, w1, w2, weights, experts, activation=activation)
                assert_as_accurate_as_reference(out, ref64, ref_low, dtype, what)


def test_decode_hidden_feeds_the_backward(triton_case):
    """The backward reads the decode kernel's ``hidden``: gradients against the reference."""
    inputs = expert_mlp_inputs(5, 6, 2, 11, 7, torch.float32, triton_case.device)
    leaves = [t.clone().requires_grad_() for t in inputs[:4]]
    with pyfast.use_backend("triton"):
        out = pyfast.moe.moe_mlp(*leaves, inputs[4])
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs[:4]]
    ref = reference.moe_mlp(*ref_leaves, inputs[4].cpu())
    cot = torch.randn(out.shape, dtype=torch.float64)
    for g, r in zip(torch.autograd.grad(out, leaves, cot.to(out)), torch.autograd.grad(ref, ref_leaves, cot)):
        assert_close(g, r, torch.float32, "grad")


@pytest.mark.parametrize("activation", ["swiglu", "silu"])
def test_grouped_path_at_decode_sizes(triton_case, monkeypatch, activation):
    from pyfast.triton_kernels.moe import decode

    monkeypatch.setattr(decode, "DECODE_MAX_TOKENS", 0)
    for T, E, k, d, ffn in SHAPES[:3]:
        inputs = expert_mlp_inputs(T, E, k, d, ffn, torch.float32, triton_case.device, activation)
        with pyfast.use_backend("triton"):
            out = pyfast.moe.moe_mlp(*inputs, activation=activation)
        x, w1, w2, weights = (t.cpu().double() for t in inputs[:4])
        assert_close(out, reference.moe_mlp(x, w1, w2, weights, inputs[4].cpu(), activation=activation), torch.float32)
