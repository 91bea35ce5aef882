"""Every bad input gets an error naming the argument, the expectation and what came."""
import pytest
import torch

import pyfast
from moe_inputs import random_experts

moe = pyfast.moe
LOGITS = torch.randn(6, 8)
X = torch.randn(6, 4)
EXPERTS = random_experts(6, 8, 2)
W_UP, W_DOWN, GATES = torch.randn(8, 10, 4), torch.randn(8, 4, 5), torch.rand(6, 2)


def _routing():
    return moe.permute(X, EXPERTS, 8)[1]


BAD_CALLS = [
    (lambda: moe.topk_gating(torch.randn(4, 8, 3), 2), ValueError, r"logits must be 2-D \(tokens, experts\), got shape \(4, 8, 3\)"),
    (lambda: moe.topk_gating(LOGITS.long(), 2), TypeError, r"logits must have dtype in .*got torch.int64"),
    (lambda: moe.topk_gating([[1.0]], 1), TypeError, r"logits must be a torch.Tensor, got list"),
    (lambda: moe.topk_gating(LOGITS, 9), ValueError, r"k must be in \[1, 8\] \(logits has 8 experts\), got 9"),
    (lambda: moe.topk_gating(LOGITS, 0), ValueError, r"k must be in \[1, 8\].*got 0"),
    (lambda: moe.topk_gating(LOGITS, 2.0), TypeError, r"k must be an int, got float"),
    (lambda: moe.topk_gating(LOGITS, 2, score="relu"), ValueError, r"score must be one of \('softmax', 'sigmoid'\), got 'relu'"),
    (lambda: moe.topk_gating(LOGITS, 2, temperature=0.0), ValueError, r"temperature must be > 0, got 0.0"),
    (lambda: moe.topk_gating(LOGITS, 2, temperature=torch.tensor(-1.0)), ValueError, r"temperature must be > 0"),
    (lambda: moe.topk_gating(LOGITS, 2, temperature=torch.ones(2)), ValueError, r"temperature must be a float or a one-element"),
    (lambda: moe.topk_gating(LOGITS, 2, bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\), got \(7,\)"),
    (lambda: moe.topk_gating(LOGITS.index_fill(0, torch.tensor([1, 4]), float("nan")), 2), ValueError, r"logits has 2 row\(s\) with non-finite values"),
    (lambda: moe.topk_gating(LOGITS.index_fill(0, torch.tensor([3]), float("inf")), 2), ValueError, r"logits has 1 row\(s\) with non-finite"),
    (lambda: moe.route(EXPERTS.float(), 8), TypeError, r"experts must have dtype in \(int32, int64\), got torch.float32"),
    (lambda: moe.route(EXPERTS + 8, 8), ValueError, r"experts must hold ids in \[0, 8\), got 12 out of range"),
    (lambda: moe.route(EXPERTS - EXPERTS.min() - 1, 8), ValueError, r"experts must hold ids in \[0, 8\), got \d+ out of range"),
    (lambda: moe.route(EXPERTS, 8, capacity=0), ValueError, r"capacity must be in \[1, inf\] \(rows kept per expert\), got 0"),
    (lambda: moe.route(EXPERTS, 8, align=0), ValueError, r"align must be in \[1, inf\]"),
    (lambda: moe.route(EXPERTS, 1), ValueError, r"k must be in \[1, 1\] \(at most num_experts=1 choices per token\), got 2"),
    (lambda: moe.route(EXPERTS, 0), ValueError, r"num_experts must be in \[1, inf\], got 0"),
    (lambda: moe.permute(X[:5], EXPERTS, 8), ValueError, r"experts must have one row per token of x \(5\), got 6"),
    (lambda: moe.permute(X.to(torch.int16), EXPERTS, 8), TypeError, r"x must have dtype in"),
    (lambda: moe.unpermute(X, torch.rand(6, 2), _routing()), ValueError, r"y_sorted must have routing's 12 rows, got 6"),
    (lambda: moe.unpermute(torch.randn(12, 4), torch.rand(6, 3), _routing()), ValueError, r"weights must have shape \(6, 2\) \(tokens, k\), got \(6, 3\)"),
    (lambda: moe.unpermute(torch.randn(12, 4), torch.rand(6, 2), (1, 2)), TypeError, r"routing must be the Routing returned by permute/route, got tuple"),
    (lambda: moe.load_balancing_loss(LOGITS, EXPERTS[:3]), ValueError, r"experts must have one row per token of router \(6\), got 3"),
    (lambda: moe.load_balancing_loss(LOGITS, EXPERTS, input="scores"), ValueError, r"input must be one of \('logits', 'probs'\)"),
    (lambda: moe.load_balancing_loss(LOGITS, EXPERTS + 100), ValueError, r"experts must hold ids in \[0, 8\)"),
    (lambda: moe.router_z_loss(LOGITS[0]), ValueError, r"logits must be 2-D"),
    (lambda: moe.moe_mlp(X, W_UP[:, :, :3], W_DOWN, GATES, EXPERTS), ValueError, r"moe_mlp: w_gate_up must have shape \(8, 10, 4\) \(experts, 2 \* ffn for 'swiglu', d\), got \(8, 10, 3\)"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN, GATES, EXPERTS, activation="gelu"), ValueError, r"w_gate_up must have shape \(8, 5, 4\) \(experts, ffn for 'gelu', d\)"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN[:, :3], GATES, EXPERTS), ValueError, r"moe_mlp: w_down must have shape \(experts, 4, ffn\) \(d of x is 4\), got \(8, 3, 5\)"),
    (lambda: moe.moe_mlp(X, W_UP.double(), W_DOWN, GATES, EXPERTS), TypeError, r"moe_mlp: x, w_gate_up, w_down must have one dtype, got x is torch.float32, w_gate_up is torch.float64"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN, GATES, EXPERTS, activation="tanh"), ValueError, r"moe_mlp: activation must be one of \('swiglu', 'geglu', 'silu', 'gelu', 'relu'\), got 'tanh'"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN, GATES[:, :1], EXPERTS), ValueError, r"moe_mlp: experts and weights must have shape \(6, k\).*got \(6, 2\) and \(6, 1\)"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN, GATES, EXPERTS + 8), ValueError, r"moe_mlp: experts must hold ids in \[0, 8\)"),
    (lambda: moe.moe_mlp(X, W_UP, W_DOWN, GATES, EXPERTS, capacity=0), ValueError, r"moe_mlp: capacity must be in \[1, inf\]"),
    (lambda: moe.moe_mlp(X, W_UP[0], W_DOWN, GATES, EXPERTS), ValueError, r"moe_mlp: w_gate_up must be 3-D \(experts, h, d\), got shape \(10, 4\)"),
    (lambda: moe.grouped_mm(torch.randn(12, 4), torch.randn(8, 3, 5), _routing()), ValueError, r"grouped_mm: w must have shape \(8, n, 4\) \(experts, n, k\), got \(8, 3, 5\)"),
    (lambda: moe.grouped_mm(torch.randn(11, 4), torch.randn(8, 3, 4), _routing()), ValueError, r"grouped_mm: x_sorted must have routing's 12 rows, got 11"),
    (lambda: moe.grouped_mm(torch.randn(12, 4), torch.randn(8, 3, 4).half(), _routing()), TypeError, r"grouped_mm: x_sorted, w must have one dtype"),
    (lambda: moe.grouped_mm(torch.randn(12, 4), torch.randn(8, 3, 4), None), TypeError, r"grouped_mm: routing must be the Routing returned by permute/route, got NoneType"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_input_message(backend, index):
    call, error, message = BAD_CALLS[index]
    with pyfast.use_backend(backend), pytest.raises(error, match=message):
        call()


def test_wrong_device_is_named():
    meta = torch.randn(6, 8, device="meta")
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got x on cpu, experts on meta"):
        moe.permute(X, EXPERTS.to("meta"), 8)
    with pytest.raises(ValueError, match=r"bias on meta"):
        moe.topk_gating(LOGITS, 2, bias=meta[0])
