"""route (expert grouping, capacity, alignment) against pyfast.moe.reference.route: bit-exact."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfast
from kernel_cases import CUDA_PARAM, KERNEL_PARAMS, make_case
from moe_inputs import random_experts
from pyfast.moe import Routing, num_rows, reference

SHAPES = [(0, 8, 2), (1, 1, 1), (7, 8, 2), (7, 60, 5), (1, 257, 1), (7, 257, 16), (4099, 8, 2), (4099, 60, 4), (4099, 257, 16)]
SMALL_SHAPES = [s for s in SHAPES if s[0] * s[2] < 2000]
LIMITS = [(None, None), (3, None), (None, 4), (2, 16), (1, 1), (1000000, 128)]


@pytest.fixture(params=KERNEL_PARAMS + [CUDA_PARAM])
def kernel(request):
    """route also has a CUDA C++ kernel (pyfast._cuda)."""
    return make_case(request.param)


def assert_routing_equal(got: Routing, ref: Routing):
    for name in Routing._fields:
        a, b = getattr(got, name).cpu(), getattr(ref, name)
        assert a.dtype == torch.int64, name
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("capacity,align", LIMITS)
@pytest.mark.parametrize("skew", [False, True])
def test_matches_reference(kernel, capacity, align, skew):
    for T, E, k in SMALL_SHAPES if kernel.interpreted else SHAPES:
        experts = random_experts(T, E, k, kernel.device, skew)
        for ids in (experts, experts.long()):
            with pyfast.use_backend(kernel.backend):
                got = pyfast.moe.route(ids, E, capacity=capacity, align=align)
            assert_routing_equal(got, reference.route(ids.cpu(), E, capacity=capacity, align=align))


def test_non_contiguous_ids(kernel):
    experts = random_experts(40, 60, 6, kernel.device)
    strided = torch.cat([experts, experts], dim=1)[:, ::2]
    assert not strided.is_contiguous()
    with pyfast.use_backend(kernel.backend):
        got = pyfast.moe.route(strided, 60, capacity=3, align=8)
    assert_routing_equal(got, reference.route(strided.cpu(), 60, capacity=3, align=8))


def test_reference_layout_invariants():
    T, E, k, capacity, align = 300, 13, 3, 40, 8
    experts = random_experts(T, E, k, skew=True)
    r = reference.route(experts, E, capacity=capacity, align=align)
    assert r.assignment_of_row.shape[0] == num_rows(T, k, E, capacity, align)
    assert (r.offsets[:-1] % align == 0).all() and (r.counts <= capacity).all()
    kept = ~r.dropped
    assert int(kept.sum()) == int(r.counts.sum())
    # Every kept assignment sits in its expert's segment and the two maps are inverse.
    rows = r.row_of_assignment[kept]
    assert torch.equal(r.assignment_of_row[rows], torch.nonzero(kept.reshape(-1)).squeeze(1))
    e = experts.long()[kept]
    assert ((rows >= r.offsets[e]) & (rows < r.offsets[e] + r.counts[e])).all()
    # Priority: a dropped assignment never outranks a kept one of the same expert.
    priority = torch.arange(k)[None, :] * T + torch.arange(T)[:, None]
    for expert in range(E):
        mine = experts.long() == expert
        if r.dropped[mine].any():
            assert priority[mine & kept].max() < priority[mine & r.dropped].min()


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 300),
    E=st.integers(1, 70),
    k_frac=st.floats(0, 1),
    capacity=st.one_of(st.none(), st.integers(1, 50)),
    align=st.one_of(st.none(), st.integers(1, 64)),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_cpu_route(T, E, k_frac, capacity, align, seed):
    k = 1 + int(k_frac * (min(E, 16) - 1))
    torch.manual_seed(seed)
    experts = random_experts(T, E, k, skew=seed % 2 == 0)
    with pyfast.use_backend("cpu"):
        got = pyfast.moe.route(experts, E, capacity=capacity, align=align)
    assert_routing_equal(got, reference.route(experts, E, capacity=capacity, align=align))


def test_million_tokens_cpu():
    """T = 2^20 tokens (the documented maximum) through route and permute on the CPU kernels."""
    T, E, k = 2**20, 8, 2
    experts = random_experts(T, E, k, skew=True)
    x = torch.randn(T, 1)
    with pyfast.use_backend("cpu"):
        x_sorted, got = pyfast.moe.permute(x, experts, E, capacity=T // 4, align=128)
    ref_sorted, ref = reference.permute(x, experts, E, capacity=T // 4, align=128)
    assert_routing_equal(got, ref)
    assert torch.equal(x_sorted, ref_sorted)
