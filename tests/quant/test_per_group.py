"""Per-group exponents: quantization, search, kernels and storage against the per-tensor reference."""
import importlib.util

import pytest
import torch
from torch import nn

import pyfast
from kernel_cases import assert_close
from power_linear_cases import check_power_linear
from pyfast.quant import reference

quant = pyfast.quant
CANDIDATES = (0.55, 0.7, 0.85, 1.0)
# (N, K, group_size, bits) as in test_power_linear: 4 bits with groups of 32k take the CPU byte-shuffle path.
WEIGHTS = [(1, 8, 8, 4), (37, 64, 8, 3), (13, 40, 8, 8), (67, 136, 136, 4), (11, 96, 32, 4), (29, 128, 32, 4)]


def _group_exponents(rows, groups, device="cpu"):
    choice = torch.randint(0, len(CANDIDATES), (rows, groups))
    return torch.tensor(CANDIDATES, dtype=torch.float64)[choice].to(device)


def _quantized(N, K, group_size, bits, symmetric=True, device="cpu"):
    w = torch.randn(N, K, dtype=torch.float64) * torch.rand(1, K, dtype=torch.float64)
    return quant.power_quantize(w, bits, _group_exponents(N, K // group_size), group_size=group_size, symmetric=symmetric).to(device)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_match_per_tensor_quantization(bits, symmetric):
    """Each group holds exactly the codes a per-tensor quantization with its exponent gives it."""
    w = torch.randn(13, 96)
    exps = _group_exponents(13, 3)
    clip = 0.6 + 0.4 * torch.rand(13, 3)
    q = quant.power_quantize(w, bits, exps, group_size=32, symmetric=symmetric, clip=clip)
    assert q.per_group and q.exponent_index.dtype == torch.uint8 and q.exponent == tuple(sorted(set(exps.flatten().tolist())))
    assert torch.equal(q.group_exponents(), exps)
    codes = reference.unpack_codes(q.codes, bits, 96).reshape(13, 3, 32)
    expected = torch.zeros_like(w)
    for a in q.exponent:
        qa = quant.power_quantize(w, bits, a, group_size=32, symmetric=symmetric, clip=clip)
        chosen = exps == a
        assert torch.equal(codes[chosen], reference.unpack_codes(qa.codes, bits, 96).reshape(13, 3, 32)[chosen])
        expected += reference.dequantize(qa) * chosen.repeat_interleave(32, dim=1)
    assert torch.equal(reference.dequantize(q), expected)
    assert torch.equal(q.scales, qa.scales)


def test_one_exponent_per_group_equals_per_tensor():
    w = torch.randn(9, 64)
    q = quant.power_quantize(w, 4, torch.full((9, 2), 0.8, dtype=torch.float64), group_size=32)
    scalar = quant.power_quantize(w, 4, 0.8, group_size=32)
    assert torch.equal(q.codes, scalar.codes) and torch.equal(q.dequantize(), scalar.dequantize())
    x = torch.randn(3, 64)
    assert torch.equal(quant.power_linear(x, q), quant.power_linear(x, scalar))


def _search_by_loops(w, bits, group_size, exps, clips, x=None):
    """Independent per-group search: every (exponent, clip) pair through power_quantize, one at a time."""
    N, K = w.shape
    weight = torch.ones(K, dtype=torch.float64) if x is None else (x.double().T @ x.double()).diagonal()
    errors = torch.stack([
        torch.stack([
            (((quant.power_quantize(w, bits, a, group_size=group_size, clip=r).dequantize().double() - w.double()) ** 2)
             * weight).reshape(N, -1, group_size).sum(-1)
            for r in clips
        ])
        for a in exps
    ])  # (E, C, N, G)
    per_exponent, clip_index = errors.min(dim=1)
    best = per_exponent.argmin(dim=0)
    clip = torch.tensor(clips, dtype=torch.float64)[clip_index.gather(0, best[None])[0]]
    return torch.tensor(exps, dtype=torch.float64)[best], clip, per_exponent.gather(0, best[None])[0]


@pytest.mark.parametrize("with_x", [False, True])
def test_search_picks_the_loop_best(with_x):
    w = torch.distributions.StudentT(4.0).sample((40, 64)).double()
    x = torch.randn(50, 64, dtype=torch.float64) * torch.rand(64, dtype=torch.float64) if with_x else None
    clips = (0.7, 0.85, 1.0)
    res = quant.search_exponent(w, 4, group_size=16, candidates=CANDIDATES, clips=clips, x=x, per_group=True)
    exps, clip, _ = _search_by_loops(w, 4, 16, CANDIDATES, clips, x)
    assert res.exponent.shape == (40, 4) and res.exponent.dtype == torch.float64
    assert torch.equal(res.exponent, exps) and torch.equal(res.clip, clip)
    assert len(set(res.exponent.flatten().tolist())) > 1  # heavy tails: groups disagree
    per_tensor = quant.search_exponent(w, 4, group_size=16, candidates=CANDIDATES, clips=clips, x=x)
    torch.testing.assert_close(res.errors, per_tensor.errors, rtol=0, atol=0)


def test_search_per_group_beats_per_tensor():
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * torch.rand(64, 1)
    per_tensor = quant.search_exponent(w, 3, group_size=32)
    per_group = quant.search_exponent(w, 3, group_size=32, per_group=True)
    err = [(quant.power_quantize(w, 3, r.exponent, group_size=32, clip=r.clip).dequantize() - w).square().sum()
           for r in (per_tensor, per_group)]
    assert err[1] < err[0]


def test_search_chunks_rows(monkeypatch):
    w = torch.randn(33, 32, dtype=torch.float64)
    whole = quant.search_exponent(w, 3, group_size=8, per_group=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 500)
    chunked = quant.search_exponent(w, 3, group_size=8, per_group=True)
    assert torch.equal(chunked.exponent, whole.exponent) and torch.equal(chunked.clip, whole.clip)


@pytest.mark.parametrize("N, K, group_size, bits", WEIGHTS)
def test_power_linear_matches_reference(kernel, N, K, group_size, bits):
    for symmetric in (True,) if kernel.interpreted else (True, False):
        q = _quantized(N, K, group_size, bits, symmetric, kernel.device)
        rows = (0, 1, 3, 9) if kernel.interpreted else (0, 1, 3, 8, 17, 40)
        check_power_linear(kernel, q, rows, f"sym={symmetric}")


def test_dequantize_and_gradient(kernel):
    for N, K, group_size, bits in WEIGHTS[:3] if kernel.interpreted else WEIGHTS:
        q = _quantized(N, K, group_size, bits, device=kernel.device)
        with pyfast.use_backend(kernel.backend):
            for dtype in kernel.dtypes:
                if dtype != torch.float64:
                    assert_close(quant.dequantize(q, dtype), reference.dequantize(q), dtype, f"dequantize {bits} bits {dtype}")
            x = torch.randn(5, K, device=kernel.device, requires_grad=True)
            grad_y = torch.randn(5, N, device=kernel.device)
            (gx,) = torch.autograd.grad(quant.power_linear(x, q), x, grad_y)
        assert_close(gx, grad_y.double() @ reference.dequantize(q).double(), torch.float32, f"grad {bits} bits")


def test_opcheck(kernel):
    q = _quantized(11, 64, 32, 4, device=kernel.device)
    weight = (q.codes, q.scales.float(), q.table(), q.exponent_index)
    assert weight[2].shape == (len(q.exponent), 16)
    x = torch.randn(1, 64, device=kernel.device, requires_grad=True)  # M = 1: the CPU byte-shuffle path
    torch.library.opcheck(torch.ops.pyfast.quant_power_linear, (x, *weight, 4, 32, kernel.backend))
    torch.library.opcheck(torch.ops.pyfast.quant_dequantize, (*weight, 4, 32, 64, torch.float32, kernel.backend))


def test_module_state_dict_and_quantize_model():
    linear = nn.Linear(64, 24)
    found = quant.search_exponent(linear.weight.detach(), 4, group_size=16, per_group=True)
    layer = quant.PowerQuantLinear.from_linear(linear, 4, found.exponent, group_size=16, clip=found.clip)
    assert layer.exponent_index.shape == (24, 4) and "per-group values" in repr(layer)
    other = quant.PowerQuantLinear(quant.power_quantize(torch.randn(24, 64), 4, found.exponent, group_size=16), torch.zeros(24))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    report = quant.quantize_model(model, 3, "powerquant", group_size=16, per_group_exponent=True, progress=False)
    assert all(m.quantized.per_group for m in (model[0], model[2]))
    assert all(min(CANDIDATES) - 0.05 <= r.exponent <= 1.0 and 0 < r.weight_error < 0.1 for r in report.layers)


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
def test_safetensors_round_trip(tmp_path):
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))

    model = mlp()
    quant.quantize_model(model, 4, "powerquant", group_size=16, per_group_exponent=True, exclude=["2"], progress=False)
    quant.save_quantized(model, tmp_path / "m.safetensors")
    fresh = quant.load_quantized(mlp(), tmp_path / "m.safetensors")
    q, loaded = model[0].quantized, fresh[0].quantized
    assert loaded.per_group and loaded.exponent == q.exponent and torch.equal(loaded.exponent_index, q.exponent_index)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def test_bad_inputs():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"power_quantize: exponent must be a float or a tensor of shape \(8, 4\) \(rows, groups\), got \(8, 3\)"):
        quant.power_quantize(w, 4, torch.ones(8, 3), group_size=8)
    with pytest.raises(ValueError, match=r"power_quantize: exponent must hold finite values > 0"):
        quant.power_quantize(w, 4, torch.zeros(8, 4), group_size=8)
    with pytest.raises(ValueError, match=r"power_quantize: exponent must hold at most 256 distinct values, got 512"):
        quant.power_quantize(torch.randn(512, 8), 4, torch.rand(512, 1) + 0.5, group_size=8)
    with pytest.raises(TypeError, match=r"power_quantize: exponent must be a floating tensor, got torch.int64"):
        quant.power_quantize(w, 4, torch.ones(8, 4, dtype=torch.long), group_size=8)
    with pytest.raises(ValueError, match=r"power_quantize: exponent must be on w's device cpu, got meta"):
        quant.power_quantize(w, 4, torch.ones(8, 4, device="meta"), group_size=8)
    with pytest.raises(TypeError, match=r"search_exponent: per_group must be a bool, got int"):
        quant.search_exponent(w, 4, group_size=8, per_group=1)
