"""Every op against the float64 reference on random inputs: shapes with 0, 1, primes and
non-multiples of the block sizes, masks, non-contiguous inputs, every input dtype."""
import pytest
import torch

import pyfast
from influence_inputs import activations, fitted_factors, to_device
from kernel_cases import assert_close
from pyfast import influence
from pyfast.influence import LowRankQuery, reference

# (b, T, d_in, d_out)
# The torch path rotates tokens or gradients by cost: T > both dims, T < both, and in between.
SHAPES = [(1, 1, 1, 1), (3, 7, 5, 4), (2, 37, 19, 23), (3, 5, 70, 33), (2, 10, 6, 20)]


def _inputs(path, shape, dtype, masked=True, transposed=False):
    b, T, d_in, d_out = shape
    a, s, mask = activations(b, T, d_in, d_out, dtype=dtype, device=path.device, masked=masked)
    if transposed:  # non-contiguous views with the same values
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
        s = s.transpose(0, 1).contiguous().transpose(0, 1)
    return a, s, mask


def _ref_mask(mask):
    return None if mask is None else mask.cpu()


def _dtypes(path):
    return [d for d in path.dtypes if d != torch.bfloat16 or not path.interpreted]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_covariance(path, shape, masked):
    for dtype in _dtypes(path):
        a, s, mask = _inputs(path, shape, dtype, masked, transposed=masked)
        for x in (a, s):
            out = influence.covariance(x, mask)
            assert out.dtype == reference.compute_dtype(dtype)
            assert_close(out, reference.covariance(x.double().cpu(), _ref_mask(mask)), dtype, f"covariance {dtype}")


def test_covariance_of_flat_rows(path):
    x = torch.randn(41, 17, device=path.device)
    mask = torch.rand(41, device=path.device) > 0.5
    assert_close(influence.covariance(x, mask), reference.covariance(x.double().cpu(), mask.cpu()), torch.float32)


@pytest.mark.parametrize("shape", SHAPES + [(2, 0, 3, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_lambda_correction(path, shape, masked):
    for dtype in _dtypes(path):
        a, s, mask = _inputs(path, shape, dtype, masked, transposed=masked)
        eig = reference.eigen_factors(torch.randn(shape[2], shape[2]), torch.randn(shape[3], shape[3]))
        Q_A, Q_S = eig.Q_A.to(path.device), eig.Q_S.to(path.device)
        out = influence.lambda_correction(a, s, Q_A, Q_S, mask)
        expected = reference.lambda_correction(a.double().cpu(), s.double().cpu(), eig.Q_A, eig.Q_S, _ref_mask(mask))
        assert out.dtype == reference.compute_dtype(dtype)
        if shape[1] == 0:
            assert bool((out == 0).all()) and out.shape == (shape[3], shape[2])
        else:
            assert_close(out, expected, dtype, f"lambda_correction {dtype}")


@pytest.mark.parametrize("shape", SHAPES + [(0, 4, 3, 5)])
@pytest.mark.parametrize("damping", [None, 0.05])
def test_self_scores(path, shape, damping):
    a64, s64, mask = activations(*shape)
    factors = fitted_factors(a64, s64, mask) if shape[0] else fitted_factors(*activations(2, *shape[1:])[:2])
    for dtype in _dtypes(path):
        a, s, _ = _inputs(path, shape, dtype)
        m = mask.to(path.device)
        out = influence.self_scores(a, s, to_device(factors, path.device), damping=damping, mask=m)
        expected = reference.self_scores(a.double().cpu(), s.double().cpu(), factors, damping, mask)
        assert out.shape == (shape[0],) and out.dtype == reference.compute_dtype(dtype)
        assert_close(out, expected, dtype, f"self_scores {dtype}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", [1, 3])
def test_precondition(torch_path, shape, q):
    path = torch_path
    _, _, d_in, d_out = shape
    factors = fitted_factors(*activations(4, 6, d_in, d_out))
    for dtype in _dtypes(path):
        V = torch.randn(q, d_out, d_in, device=path.device).to(dtype)
        out = influence.precondition(V, to_device(factors, path.device))
        assert out.dtype == reference.compute_dtype(dtype)
        assert_close(out, reference.precondition(V.double().cpu(), factors), dtype, f"precondition {dtype}")
        single = influence.precondition(V[0], to_device(factors, path.device), damping=0.2)
        assert_close(single, reference.precondition(V[0].double().cpu(), factors, 0.2), dtype, "precondition 2-D")


@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4, 5), (2, 0, 4, 5)])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("per_token", [False, True])
def test_pairwise_scores(path, shape, q, per_token):
    b, T, d_in, d_out = shape
    for dtype in _dtypes(path):
        a, s, mask = _inputs(path, shape, dtype, transposed=True)
        P = torch.randn(q, d_out, d_in, device=path.device).to(dtype)
        out = influence.pairwise_scores(P, a, s, mask=mask, per_token=per_token)
        expected = reference.pairwise_scores(P.double().cpu(), a.double().cpu(), s.double().cpu(), _ref_mask(mask), per_token)
        assert out.shape == ((q, b, T) if per_token else (q, b)) and out.dtype == reference.compute_dtype(dtype)
        assert_close(out, expected, dtype, f"pairwise_scores {dtype}")


@pytest.mark.parametrize("shape", SHAPES + [(2, 40, 6, 5)])  # the last goes through G_n chunks
@pytest.mark.parametrize("per_token", [False, True])
def test_pairwise_scores_low_rank(path, shape, per_token):
    b, T, d_in, d_out = shape
    factors = fitted_factors(*activations(4, 6, d_in, d_out))
    for dtype in _dtypes(path):
        a, s, mask = _inputs(path, shape, dtype)
        with pyfast.use_backend("auto"):  # precondition has no Triton kernel
            query = influence.precondition(torch.randn(3, d_out, d_in, device=path.device), to_device(factors, path.device), rank=2)
        assert isinstance(query, LowRankQuery) and query.left.shape == (3, d_out, min(2, d_in, d_out))
        out = influence.pairwise_scores(query, a, s, mask=mask, per_token=per_token)
        query64 = LowRankQuery(query.left.double().cpu(), query.right.double().cpu())
        expected = reference.pairwise_scores(query64, a.double().cpu(), s.double().cpu(), _ref_mask(mask), per_token)
        assert_close(out, expected, dtype, f"low-rank pairwise_scores {dtype}")


def test_per_token_scores_sum_to_sequence_scores(path):
    a, s, mask = _inputs(path, (3, 11, 6, 5), torch.float32)
    P = torch.randn(2, 5, 6, device=path.device)
    per_token = influence.pairwise_scores(P, a, s, mask=mask, per_token=True)
    assert_close(per_token.sum(dim=-1), influence.pairwise_scores(P, a, s, mask=mask), torch.float32)
    assert bool((per_token[:, ~mask] == 0).all())


def test_reference_backend_runs_the_reference(monkeypatch):
    a, s, mask = activations(2, 3, 4, 5)
    calls = []
    monkeypatch.setattr(reference, "lambda_correction", lambda *args: calls.append(args) or torch.zeros(5, 4))
    Q = torch.eye(4, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    with pyfast.use_backend("reference"):
        influence.lambda_correction(a, s, *Q, mask)
    assert len(calls) == 1
