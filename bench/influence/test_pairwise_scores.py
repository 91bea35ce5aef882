"""Pairwise influence scores between preconditioned queries and the training examples of one
GPT-2-small MLP layer (see layer_workload.py): 4 dense queries, and 16 rank-32 queries.

Providers: pyfast (`pyfast.influence.pairwise_scores`: the cheaper of per-token contraction and
chunked per-example gradients; rank-factored queries never form a gradient), reference (explicit
per-example gradients), kronfluence (its pairwise-score einsum, opt_einsum contraction order).
Scores checked against the float64 reference before timing.

Bytes moved (floor): a, s and the queries read once, scores written.
"""
import functools

import pytest
import torch

from layer_workload import layer_shapes, setup
from pyfast import influence
from pyfast.influence import reference

SUITE = "influence pairwise_scores"
QUERIES = {"dense-q4": (4, None), "rank32-q16": (16, 32)}


@functools.lru_cache(maxsize=4)
def _queries(shape, kind, device):
    layer = setup(shape, device)
    q, rank = QUERIES[kind]
    g = torch.Generator().manual_seed(1)
    V = torch.randn(q, layer.s.shape[-1], layer.a.shape[-1], generator=g).to(device)
    return influence.precondition(V, layer.factors, rank=rank)


@functools.lru_cache(maxsize=4)
def _expected(shape, kind):
    layer = setup(shape, torch.device("cpu"))
    query = _queries(shape, kind, torch.device("cpu"))
    query64 = type(query)(*(t.double() for t in query)) if isinstance(query, tuple) else query.double()
    return reference.pairwise_scores(query64, layer.a.double(), layer.s.double())


@pytest.mark.parametrize("provider", ["pyfast", "reference", "kronfluence"])
@pytest.mark.parametrize("kind", list(QUERIES))
@pytest.mark.parametrize("shape", layer_shapes())
def test_pairwise_scores(measure, expect_close, device, kronfluence_layer, shape, kind, provider):
    layer = setup(shape, device)
    query = _queries(shape, kind, device)
    if provider == "pyfast":
        fn = lambda: influence.pairwise_scores(query, layer.a, layer.s)  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.pairwise_scores(query, layer.a, layer.s)  # noqa: E731
    else:
        kf_query = list(query) if isinstance(query, tuple) else query
        fn = functools.partial(kronfluence_layer(layer, 1.0).pairwise_scores, kf_query)
    b, T, d_in = layer.a.shape
    d_out = layer.s.shape[-1]
    query_elements = sum(t.numel() for t in query) if isinstance(query, tuple) else query.numel()
    q = QUERIES[kind][0]
    measure(
        fn,
        suite=SUITE,
        workload=f"{kind} b={b} T={T} {d_in - 1}->{d_out} float32",
        provider=provider,
        bytes_moved=(b * T * (d_in + d_out) + query_elements + q * b) * 4,
        sizes={**layer.sizes, "queries": q, "rank": QUERIES[kind][1]},
        check=expect_close(_expected(shape, kind), 1e-4, f"{provider} pairwise_scores {kind}"),
    )
