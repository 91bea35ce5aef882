"""The CPU grouped expert GEMM (csrc/cpu/moe/expert_gemm.cpp) at the edges of its tiling: segments
of 1, 8, 9, 15, 16, 17 and prime rows and empty experts (16-row panels, 8-row tail tile), output
widths around and below the 6- and 16-column tiles and across 96-column work items, K = 0, 1,
odd K and K over one 256-deep chunk,
padded routing, strided inputs, both weight layouts, 16-bit storage; through `grouped_mm` and
`moe_mlp`, forward and backward, against the float64 reference."""
import os

import pytest
import torch

import pyfast
from kernel_cases import assert_as_accurate_as_reference, assert_close
from pyfast import _ext
from pyfast.moe import reference

COUNTS = [0, 1, 15, 16, 17, 0, 8, 9, 31, 2]  # rows per expert (k = 1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _experts_with_counts(counts, seed=0):
    """``(T, 1)`` int32 expert ids, shuffled, giving expert e exactly ``counts[e]`` rows."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    gen = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(ids.numel(), generator=gen)].to(torch.int32)[:, None]


def _random(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _grouped_reference(a, w, routing, trans_w):
    """float64 ``a_e @ w[e].T`` (``w[e] @`` for ``trans_w``) on each segment, zeros elsewhere."""
    w64 = w.double().transpose(1, 2) if trans_w else w.double()
    return reference.grouped_mm(a.double(), w64, routing)


def test_expert_gemm_is_available_on_avx2_cpus():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx2" not in flags or "fma" not in flags:
        pytest.skip("the C++ expert GEMM needs AVX2 + FMA")
    assert _ext.cpu.moe_expert_gemm_available()


@pytest.mark.parametrize("trans_w", [False, True], ids=["w(E,N,K)", "w(E,K,N)"])
@pytest.mark.parametrize("align", [None, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_tile_edges(dtype, align, trans_w, gemm_path):
    E = len(COUNTS)
    experts = _experts_with_counts(COUNTS)
    routing = pyfast.moe.route(experts, E, align=align)
    ref_routing = reference.route(experts, E, align=align)
    rows = routing.assignment_of_row.shape[0]
    for n, k in [(1, 1), (5, 7), (6, 33), (13, 16), (100, 3), (197, 12), (4, 0), (17, 300)]:
        a = _random(rows, k, dtype=dtype)
        w = _random(E, k, n, dtype=dtype) if trans_w else _random(E, n, k, dtype=dtype)
        out = torch.ops.pyfast.moe_grouped_mm(a, w, routing.counts, routing.offsets, trans_w, "cpu")
        assert out.dtype == dtype and out.shape == (rows, n)
        assert_close(out, _grouped_reference(a, w, ref_routing, trans_w), dtype, f"n={n} k={k} {dtype}")


@pytest.mark.parametrize("trans_w", [False, True], ids=["w(E,N,K)", "w(E,K,N)"])
def test_grouped_mm_strided_inputs(trans_w):
    E, n, k = len(COUNTS), 29, 11
    routing = pyfast.moe.route(_experts_with_counts(COUNTS, seed=1), E)
    rows = routing.assignment_of_row.shape[0]
    a = _random(rows, 3 * k, dtype=torch.float32)[:, k : 2 * k]  # row stride 3k
    # The other layout's storage seen through a transpose: the unit stride is on the other axis.
    shape = (E, n, k) if trans_w else (E, k, n)
    w = _random(*shape, dtype=torch.float32).transpose(1, 2)
    assert not w.is_contiguous()
    out = torch.ops.pyfast.moe_grouped_mm(a, w, routing.counts, routing.offsets, trans_w, "cpu")
    assert_close(out, _grouped_reference(a, w, routing, trans_w), torch.float32)


@pytest.fixture(params=["avx2", "torch"])
def gemm_path(request, monkeypatch):
    """The C++ GEMM, and the torch BLAS path that CPUs without AVX2 (and float64) run."""
    if request.param == "torch":
        monkeypatch.setattr(pyfast.moe._cpu, "_has_expert_gemm", lambda: False)
    elif not _ext.cpu.moe_expert_gemm_available():
        pytest.skip("the C++ expert GEMM needs AVX2 + FMA")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_mlp_tile_edges(dtype, gemm_path):
    """Fused gather + both GEMMs + combine, forward and backward (dx and da run the transposed
    layout), with every segment length of COUNTS; d and ffn not multiples of the tiles."""
    E, d, ffn = len(COUNTS), 13, 7
    experts = _experts_with_counts(COUNTS, seed=2)
    T = experts.shape[0]
    x = _random(T, d, dtype=dtype)
    w1, w2 = _random(E, 2 * ffn, d, dtype=dtype, scale=d**-0.5), _random(E, d, ffn, dtype=dtype, scale=ffn**-0.5)
    weights = torch.rand(T, 1, dtype=torch.float64).add(0.5).to(dtype)
    grad_out = _random(T, d, dtype=dtype)

    def run(module, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = module.moe_mlp(*leaves, experts)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    with pyfast.use_backend("cpu"):
        got = run(pyfast.moe, (x, w1, w2, weights))
    expected = run(reference, [t.double() for t in (x, w1, w2, weights)])
    in_dtype = run(reference, (x, w1, w2, weights))
    for name, g, r64, rlow in zip(("out", "dx", "dw_gate_up", "dw_down", "dweights"), got, expected, in_dtype):
        assert g.dtype == dtype, name
        if dtype == torch.float32:
            assert_close(g, r64, dtype, name)
        else:
            assert_as_accurate_as_reference(g, r64, rlow, dtype, name)


@pytest.mark.parametrize("trans_w", [False, True], ids=["w(E,N,K)", "w(E,K,N)"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_weight_grad_blocks(dtype, trans_w, gemm_path):
    """The weight gradient's blocking: a segment over one 256-row pass (300 rows), gradient sizes
    across 96-row and 256-column work items with tails (n = 101, k = 263), padded routing."""
    counts = [300, 0, 7, 1, 97]
    E, n, k = len(counts), 101, 263
    experts = _experts_with_counts(counts, seed=3)
    routing = pyfast.moe.route(experts, E, align=8)
    rows = routing.assignment_of_row.shape[0]
    a = _random(rows, k, dtype=dtype).requires_grad_()
    w = (_random(E, k, n, dtype=dtype) if trans_w else _random(E, n, k, dtype=dtype)).requires_grad_()
    grad = _random(rows, n, dtype=dtype)
    out = torch.ops.pyfast.moe_grouped_mm(a, w, routing.counts, routing.offsets, trans_w, "cpu")
    (dw,) = torch.autograd.grad(out, [w], grad)
    expected = torch.zeros(w.shape, dtype=torch.float64)
    for e, (start, count) in enumerate(zip(routing.offsets.tolist(), routing.counts.tolist())):
        g_e, a_e = grad[start : start + count].double(), a[start : start + count].detach().double()
        expected[e] = a_e.T @ g_e if trans_w else g_e.T @ a_e
    assert dw.dtype == dtype
    assert_close(dw, expected, dtype, f"dw {dtype}")


def test_moe_mlp_weight_grads_long_segments(gemm_path):
    """The fused-gather weight gradients of `moe_mlp` with a 300-row expert and d, 2 ffn past the
    work items (d = 260, ffn = 50)."""
    counts = [300, 3, 0, 40]
    E, d, ffn = len(counts), 260, 50
    experts = _experts_with_counts(counts, seed=4)
    T = experts.shape[0]
    x = _random(T, d, dtype=torch.float32)
    w1, w2 = _random(E, 2 * ffn, d, dtype=torch.float32, scale=d**-0.5), _random(E, d, ffn, dtype=torch.float32, scale=ffn**-0.5)
    weights = torch.rand(T, 1, dtype=torch.float64).add(0.5).float()
    grad_out = _random(T, d, dtype=torch.float32)

    def grads(module, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        return torch.autograd.grad(module.moe_mlp(*leaves, experts), leaves[1:3], grad_out.to(leaves[0].dtype))

    with pyfast.use_backend("cpu"):
        got = grads(pyfast.moe, (x, w1, w2, weights))
    expected = grads(reference, [t.double() for t in (x, w1, w2, weights)])
    for name, g, r in zip(("dw_gate_up", "dw_down"), got, expected):
        assert_close(g, r, torch.float32, name)
