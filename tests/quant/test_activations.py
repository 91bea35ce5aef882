"""Activation fake quantization (W4A8-style): the per-token grid, power_linear with act_bits, the
straight-through gradient, the exponent search and the module / model options."""
import importlib.util

import pytest
import torch
from torch import nn

import pyfast
from kernel_cases import assert_close
from pyfast.quant import reference

quant = pyfast.quant


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("exponent", [0.6, 1.0])
def test_quantize_activations_is_nearest_per_token_grid_point(bits, exponent):
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    x[0, 1] = 0  # an all-zero token stays zero
    s = x.abs().amax(-1, keepdim=True)
    y = x / torch.where(s > 0, s, torch.ones_like(s))
    u = torch.sign(y) * y.abs() ** exponent
    t = reference.normalized_grid(bits, symmetric=False)
    codes = (u[..., None] - t).abs().argmin(-1)
    expected = reference.levels(bits, exponent, symmetric=False)[codes] * s
    out = reference.quantize_activations(x, bits, exponent)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert torch.equal(out[0, 1], torch.zeros(40))


def test_eight_bits_exponent_one_is_int8_absmax():
    x = torch.randn(6, 64)
    s = x.abs().amax(-1, keepdim=True)
    int8 = torch.round(x / s * 128).clamp(-128, 127)
    torch.testing.assert_close(reference.quantize_activations(x, 8, 1.0), int8 * (s / 128), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act_bits, act_exponent", [(8, 1.0), (8, 0.7), (4, 0.8)])
def test_power_linear_quantizes_x_first(kernel, act_bits, act_exponent):
    w = torch.randn(21, 64, dtype=torch.float64)
    q = quant.power_quantize(w, 4, 0.75, group_size=32).to(kernel.device)
    for dtype in kernel.dtypes:
        if dtype == torch.float64:
            continue  # runs the reference
        for M in (0, 1, 5) if kernel.interpreted else (0, 1, 5, 20):
            x = torch.randn(M, 64, device=kernel.device).to(dtype)
            with pyfast.use_backend(kernel.backend):
                y = quant.power_linear(x, q, act_bits=act_bits, act_exponent=act_exponent)
                plain = quant.power_linear(reference.quantize_activations(x, act_bits, act_exponent), q)
            assert torch.equal(y, plain), f"M={M} {dtype}"
            expected = reference.power_linear(x, q, act_bits, act_exponent).double()
            assert_close(y, expected, dtype, f"M={M} {dtype}")
            assert M == 0 or (y - quant.power_linear(x, q)).abs().max() > 0  # the quantization changes y


def test_straight_through_gradient(kernel):
    q = quant.power_quantize(torch.randn(13, 32), 4, 0.8, group_size=16).to(kernel.device)
    x = torch.randn(4, 32, device=kernel.device, requires_grad=True)
    grad_y = torch.randn(4, 13, device=kernel.device)
    with pyfast.use_backend(kernel.backend):
        (g,) = torch.autograd.grad(quant.power_linear(x, q, act_bits=8, act_exponent=0.9), x, grad_y)
    assert_close(g, grad_y.double() @ reference.dequantize(q).double(), torch.float32, "STE: d fq(x)/dx = 1")
    x64 = x.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(reference.power_linear(x64, q, 8, 0.9), x64, grad_y.double())
    assert_close(g, g_ref, torch.float32, "reference STE")


def test_search_activation_exponent_picks_the_best_candidate():
    x = torch.distributions.StudentT(3.0).sample((64, 96))
    candidates = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    errors = [(reference.quantize_activations(x.double(), 4, a) - x.double()).square().sum().item() for a in candidates]
    assert quant.search_activation_exponent(x, 4, candidates=candidates) == candidates[errors.index(min(errors))]
    assert min(errors) < errors[-1]  # heavy tails: a power grid beats uniform


def test_module_and_quantize_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    x = torch.randn(30, 64)
    before = model(x).detach()
    quant.quantize_model(model, 4, "powerquant", group_size=16, act_bits=8, calib=lambda m: m(x), progress=False)
    layer = model[0]
    assert layer.act_bits == 8 and layer.act_exponent in reference.DEFAULT_EXPONENTS and "act_bits=8" in repr(layer)
    h = torch.randn(3, 64)
    expected = quant.power_linear(reference.quantize_activations(h, 8, layer.act_exponent), layer.quantized) + layer.bias
    assert torch.equal(layer(h), expected)
    assert ((model(x) - before).norm() / before.norm()).item() < 0.1
    given = nn.Sequential(nn.Linear(64, 16))
    quant.quantize_model(given, 4, "uniform", group_size=16, act_bits=4, act_exponent=0.7, progress=False)
    assert given[0].act_bits == 4 and given[0].act_exponent == 0.7


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
def test_safetensors_keeps_activation_settings(tmp_path):
    model = nn.Sequential(nn.Linear(32, 8))
    quant.quantize_model(model, 4, "uniform", group_size=16, act_bits=8, act_exponent=0.8, progress=False)
    quant.save_quantized(model, tmp_path / "m.safetensors")
    fresh = quant.load_quantized(nn.Sequential(nn.Linear(32, 8)), tmp_path / "m.safetensors")
    assert fresh[0].act_bits == 8 and fresh[0].act_exponent == 0.8
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), model(x))


def test_bad_inputs():
    q = quant.power_quantize(torch.randn(4, 16), 4, 0.8, group_size=8)
    with pytest.raises(ValueError, match=r"power_linear: act_bits must be one of \(3, 4, 8\), got 6"):
        quant.power_linear(torch.randn(2, 16), q, act_bits=6)
    with pytest.raises(ValueError, match=r"power_linear: act_exponent must be finite and > 0, got 0.0"):
        quant.power_linear(torch.randn(2, 16), q, act_bits=8, act_exponent=0.0)
    with pytest.raises(TypeError, match=r"PowerQuantLinear: act_bits must be an int, got float"):
        quant.PowerQuantLinear(q, act_bits=8.0)
    with pytest.raises(ValueError, match=r"quantize_model: act_exponent must be finite and > 0, got -1.0"):
        quant.quantize_model(nn.Linear(16, 4), 4, act_bits=8, act_exponent=-1.0, progress=False)
    with pytest.raises(ValueError, match=r"search_activation_exponent: x must have at least one dimension"):
        quant.search_activation_exponent(torch.tensor(1.0), 8)
