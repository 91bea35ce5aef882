"""Self-influence scores ``<H^-1 G_n, G_n>`` of the training examples of one GPT-2-small MLP layer
(see layer_workload.py), damping 0.1 x mean(Lambda).

Providers: pyfast (`pyfast.influence.self_scores`: squares in the eigenbasis, no back-rotation,
no per-example gradients beyond a bounded chunk / the fused Triton kernel), reference (explicit
per-example gradients, preconditioned), kronfluence (its per-sample gradients and EK-FAC
preconditioning). Checked against the float64 reference before timing.

Bytes moved (floor): a and s read once, Lambda read, scores written.
"""
import functools

import pytest
import torch

from layer_workload import layer_shapes, setup
from pyfast import influence
from pyfast.influence import reference

SUITE = "influence self_scores"


@functools.lru_cache(maxsize=2)
def _expected(shape):
    layer = setup(shape, torch.device("cpu"))
    return reference.self_scores(layer.a.double(), layer.s.double(), layer.factors)


@pytest.mark.parametrize("provider", ["pyfast", "reference", "kronfluence"])
@pytest.mark.parametrize("shape", layer_shapes())
def test_self_scores(measure, expect_close, device, kronfluence_layer, shape, provider):
    layer = setup(shape, device)
    damping = reference.default_damping(layer.factors.Lambda)
    if provider == "pyfast":
        fn = lambda: influence.self_scores(layer.a, layer.s, layer.factors)  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.self_scores(layer.a, layer.s, layer.factors)  # noqa: E731
    else:
        fn = kronfluence_layer(layer, damping).self_scores
    b, T, d_in = layer.a.shape
    d_out = layer.s.shape[-1]
    measure(
        fn,
        suite=SUITE,
        workload=f"b={b} T={T} {d_in - 1}->{d_out} float32",
        provider=provider,
        bytes_moved=(b * T * (d_in + d_out) + d_out * d_in + b) * 4,
        sizes=layer.sizes,
        # 1 / (Lambda + damping) spans decades: float32 sums lose more than 1e-4 here.
        check=expect_close(_expected(shape), 1e-3, f"{provider} self_scores"),
    )
