"""NUPES calibration: exponent gradients, the fake quantization, improvement, determinism."""
import pytest
import torch

import pyfast
from pyfast.quant import reference

quant = pyfast.quant


def test_exponent_gradient_of_levels():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    for symmetric in (True, False):
        assert torch.autograd.gradcheck(lambda e: reference.levels(3, e, symmetric), (a,))


def test_fake_quantize_matches_dequantize_and_is_finite():
    w = torch.randn(6, 32, dtype=torch.float64)
    w[0, :4] = 0  # the power's derivative blows up at 0 without care
    for symmetric in (True, False):
        q = quant.power_quantize(w, 4, 0.75, group_size=16, symmetric=symmetric)
        a = torch.tensor(0.75, dtype=torch.float64, requires_grad=True)
        v = w.reshape(6, 2, 16).clone().requires_grad_()
        fq = quant.fake_quantize(v, q.scales[..., None], 4, a, symmetric)
        torch.testing.assert_close(fq.reshape(6, 32), q.dequantize(), rtol=1e-12, atol=1e-12)
        fq.square().sum().backward()
        assert torch.isfinite(v.grad).all() and torch.isfinite(a.grad) and a.grad != 0


@pytest.mark.parametrize("with_x", [False, True])
def test_nupes_improves_on_search_and_is_deterministic(with_x):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((24, 64))
    x = torch.randn(300, 64) * torch.rand(64) if with_x else None
    runs = [quant.nupes_calibrate(w, 3, x, group_size=32, steps=40, exponent_lr=0.1, batch_rows=128, progress=False) for _ in range(2)]
    first, second = runs
    assert torch.equal(first.q.codes, second.q.codes) and first.exponent == second.exponent
    # Data-free, round-to-nearest is already optimal for fixed scales; with data the joint descent gains.
    assert first.loss < first.initial_loss if with_x else first.loss <= first.initial_loss
    d = first.q.dequantize() - w
    actual = (d.square().sum() / w.square().sum()) if x is None else ((x @ d.T).square().sum() / (x @ w.T).square().sum())
    assert actual.item() <= first.loss * 1.05


def test_quantize_model_nupes():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(64, 32)
    report = quant.quantize_model(model, 4, "nupes", group_size=16, calib=lambda m: m(x), nupes_steps=5, progress=False)
    assert len(report.layers) == 2 and isinstance(model[0], quant.PowerQuantLinear)


def test_nupes_bad_inputs():
    with pytest.raises(ValueError, match=r"nupes_calibrate: bits must be one of"):
        quant.nupes_calibrate(torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match=r"nupes_calibrate: x must be a tensor with last dimension in_features = 8, got \(3, 7\)"):
        quant.nupes_calibrate(torch.randn(4, 8), 4, torch.randn(3, 7), group_size=8)
