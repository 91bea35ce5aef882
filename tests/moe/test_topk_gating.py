"""topk_gating kernels against pyfast.moe.reference.topk_gating."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfast
from kernel_cases import assert_as_accurate_as_reference, assert_close
from pyfast.moe import reference

# (T, E, k): empty, single token/expert, primes, non-multiples of every block size, k up to 16.
SHAPES = [(0, 8, 2), (1, 1, 1), (7, 8, 2), (7, 60, 5), (1, 257, 1), (7, 257, 16), (13, 60, 16), (4099, 8, 2), (4099, 257, 16)]
SMALL_SHAPES = [s for s in SHAPES if s[0] * s[1] < 20000]


def _shapes(kernel):
    return SMALL_SHAPES if kernel.interpreted else SHAPES


def _logits(T, E, dtype, device, ties=False):
    if ties:  # few distinct values: most rows hold ties
        return torch.randint(-2, 3, (T, E)).to(dtype).to(device)
    return (3 * torch.randn(T, E, dtype=torch.float64)).to(dtype).to(device)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(kernel, score, renormalize, ties):
    for T, E, k in _shapes(kernel):
        for dtype in kernel.dtypes:
            logits = _logits(T, E, dtype, kernel.device, ties)
            with pyfast.use_backend(kernel.backend):
                weights, experts = pyfast.moe.topk_gating(
                    logits, k, score=score, renormalize=renormalize, temperature=0.7
                )
            ref_w, ref_e = reference.topk_gating(
                logits.cpu(), k, score=score, renormalize=renormalize, temperature=0.7
            )
            what = f"T={T} E={E} k={k} {dtype}"
            assert experts.dtype == torch.int32 and weights.dtype == dtype
            assert torch.equal(experts.cpu(), ref_e), what
            # Weights against the float64 reference with the same selection.
            ref64, _ = reference.topk_gating(
                logits.cpu().double(), k, score=score, renormalize=renormalize, temperature=0.7
            )
            assert_close(weights, ref64, dtype, what)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_routing_bias_selects_but_does_not_weight(kernel, score):
    T, E, k = (37, 60, 6) if kernel.interpreted else (515, 60, 6)
    for dtype in kernel.dtypes:
        logits = _logits(T, E, dtype, kernel.device)
        bias = torch.randn(E, dtype=dtype, device=kernel.device)
        with pyfast.use_backend(kernel.backend):
            weights, experts = pyfast.moe.topk_gating(logits, k, score=score, bias=bias)
        ref_w, ref_e = reference.topk_gating(logits.cpu(), k, score=score, bias=bias.cpu())
        assert torch.equal(experts.cpu(), ref_e)
        ref64, _ = reference.topk_gating(logits.cpu().double(), k, score=score, bias=bias.cpu().double())
        assert_close(weights, ref64, dtype)
        unbiased = reference.topk_gating(logits.cpu(), k, score=score)[1]
        assert not torch.equal(ref_e, unbiased), "the bias should change some choices in this test"


def test_non_contiguous_rows(kernel):
    wide = torch.randn(33, 100, device=kernel.device)
    logits = wide[:, 10:70]  # row stride 100, 60 experts
    also = torch.randn(60, 33, device=kernel.device).t()  # column-major
    for x in (logits, also):
        with pyfast.use_backend(kernel.backend):
            weights, experts = pyfast.moe.topk_gating(x, 4)
        ref_w, ref_e = reference.topk_gating(x.cpu().double(), 4)
        assert torch.equal(experts.cpu(), ref_e)
        assert_close(weights, ref_w, torch.float32)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradients_match_reference(kernel, score, renormalize):
    T, E, k = (9, 60, 5) if kernel.interpreted else (131, 60, 5)
    dtypes = [d for d in kernel.dtypes if d in (torch.float64, torch.float32)]
    for dtype in dtypes:
        base = _logits(T, E, dtype, kernel.device)
        grad_out = torch.randn(T, k, dtype=dtype, device=kernel.device)
        temperature = torch.tensor(0.8, dtype=dtype, device=kernel.device)

        def run(fn, logits, temp):
            weights, _ = fn(logits, k, score=score, renormalize=renormalize, temperature=temp)
            return torch.autograd.grad((weights * grad_out.to(weights.device)).sum(), (logits, temp))

        logits = base.clone().requires_grad_()
        temp = temperature.clone().requires_grad_()
        with pyfast.use_backend(kernel.backend):
            g_logits, g_temp = run(pyfast.moe.topk_gating, logits, temp)
        r_logits, r_temp = run(reference.topk_gating, base.cpu().double().requires_grad_(), temperature.cpu().double().requires_grad_())
        _, low_temp = run(reference.topk_gating, base.cpu().requires_grad_(), temperature.cpu().requires_grad_())
        assert_close(g_logits, r_logits, dtype, "grad logits")
        # dL/dT = -sum(dL/dlogits * logits) / T cancels heavily: compare with the reference in dtype.
        assert_as_accurate_as_reference(g_temp, r_temp, low_temp, dtype, "grad temperature")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_gradcheck(score, renormalize):
    logits = (3 * torch.randn(6, 9, dtype=torch.float64)).requires_grad_()
    temperature = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def weights(lg, t):
        return reference.topk_gating(lg, 3, score=score, renormalize=renormalize, temperature=t)[0]

    assert torch.autograd.gradcheck(weights, (logits, temperature))


def test_half_weights_within_twice_reference_error(kernel):
    """FlashAttention's rule: the kernel's error is at most 2x that of the reference run in the
    same precision (plus a float32-epsilon floor)."""
    for dtype in (d for d in kernel.dtypes if d in (torch.float16, torch.bfloat16)):
        logits = _logits(257, 60, dtype, kernel.device)
        with pyfast.use_backend(kernel.backend):
            weights, _ = pyfast.moe.topk_gating(logits, 8)
        low, _ = reference.topk_gating(logits.cpu(), 8)
        exact, _ = reference.topk_gating(logits.cpu().double(), 8)
        kernel_err = (weights.cpu().double() - exact).norm()
        ref_err = (low.double() - exact).norm()
        assert kernel_err <= 2 * ref_err + 1e-6 * exact.norm()


def test_large_k_and_experts_fall_back_to_reference():
    logits = torch.randn(5, 600)
    weights, experts = pyfast.moe.topk_gating(logits, 20)
    ref_w, ref_e = reference.topk_gating(logits, 20)
    assert torch.equal(experts, ref_e) and torch.equal(weights, ref_w)


@settings(max_examples=50, deadline=None)
@given(
    T=st.integers(0, 200),
    E=st.integers(1, 300),
    k_frac=st.floats(0, 1),
    score=st.sampled_from(["softmax", "sigmoid"]),
    renormalize=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_cpu_gating(T, E, k_frac, score, renormalize, ties, seed):
    k = 1 + int(k_frac * (min(E, 16) - 1))
    torch.manual_seed(seed)
    logits = _logits(T, E, torch.float64, "cpu", ties)
    with pyfast.use_backend("cpu"):
        weights, experts = pyfast.moe.topk_gating(logits, k, score=score, renormalize=renormalize)
    ref_w, ref_e = reference.topk_gating(logits, k, score=score, renormalize=renormalize)
    assert torch.equal(experts, ref_e)
    assert_close(weights, ref_w, torch.float64)
