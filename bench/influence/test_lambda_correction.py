"""EK-FAC eigenvalue correction Lambda for one GPT-2-small MLP layer (see conftest.py).

Providers: pyfast (`pyfast.influence.lambda_correction`: rotate tokens, contract per example in
bounded chunks / the fused Triton kernel), reference (explicit per-example gradients, then
rotation), kronfluence (its per-sample gradients and Lambda update). Output checked against the
float64 reference before timing.

Bytes moved (floor of a fused implementation): a and s read once, Lambda written:
b*T*(d_in + d_out)*4 + d_out*d_in*4.
"""
import functools

import pytest
import torch

from layer_workload import layer_shapes, setup
from pyfast import influence
from pyfast.influence import reference

SUITE = "influence lambda_correction (EK-FAC eigenvalue correction)"


@functools.lru_cache(maxsize=2)
def _expected(shape):
    layer = setup(shape, torch.device("cpu"))
    return reference.lambda_correction(layer.a.double(), layer.s.double(), layer.eigen.Q_A, layer.eigen.Q_S)


@pytest.mark.parametrize("provider", ["pyfast", "reference", "kronfluence"])
@pytest.mark.parametrize("shape", layer_shapes())
def test_lambda_correction(measure, expect_close, device, kronfluence_layer, shape, provider):
    layer = setup(shape, device)
    Q_A, Q_S = layer.eigen.Q_A, layer.eigen.Q_S
    fns = {
        "pyfast": lambda: influence.lambda_correction(layer.a, layer.s, Q_A, Q_S),
        "reference": lambda: reference.lambda_correction(layer.a, layer.s, Q_A, Q_S),
    }
    if provider == "kronfluence":
        fns["kronfluence"] = kronfluence_layer(layer, 1.0).lambda_correction
    b, T, d_in = layer.a.shape
    d_out = layer.s.shape[-1]
    measure(
        fns[provider],
        suite=SUITE,
        workload=f"b={b} T={T} {d_in - 1}->{d_out} float32",
        provider=provider,
        bytes_moved=(b * T * (d_in + d_out) + d_out * d_in) * 4,
        sizes=layer.sizes,
        check=expect_close(_expected(shape), 1e-4, f"{provider} lambda_correction"),
    )
