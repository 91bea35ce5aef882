"""Every bad input gets an error naming the function, the argument, the expectation and what came."""
import pytest
import torch

import pyfast
from influence_inputs import activations, fitted_factors
from pyfast import influence
from pyfast.influence import EKFACFactors, LowRankQuery

A, S, MASK = activations(3, 4, 5, 6, dtype=torch.float32)
FACTORS = fitted_factors(A, S, MASK)
Q_A, Q_S = FACTORS.Q_A, FACTORS.Q_S
P = torch.randn(2, 6, 5)
NAN_A = A.clone().index_fill(1, torch.tensor([2]), float("nan"))

BAD_CALLS = [
    (lambda: influence.covariance([[1.0]]), TypeError, r"covariance: x must be a torch.Tensor, got list"),
    (lambda: influence.covariance(A.long()), TypeError, r"covariance: x must have dtype in .*got torch.int64"),
    (lambda: influence.covariance(A, MASK[:, :3]), ValueError, r"covariance: mask must have shape \(3, 4\) \(x.shape\[:-1\]\), got \(3, 3\)"),
    (lambda: influence.covariance(A, torch.zeros(3, 4, dtype=torch.bool)), ValueError, r"covariance: no unmasked rows"),
    (lambda: influence.covariance(A[:0]), ValueError, r"covariance: no unmasked rows \(x has 0 rows"),
    (lambda: influence.covariance(NAN_A), ValueError, r"covariance: x has non-finite values"),
    (lambda: influence.eigen_factors(torch.randn(3, 4), torch.eye(2), name="fc1"), ValueError, r"eigen_factors: fc1: A must be square, got shape \(3, 4\)"),
    (lambda: influence.eigen_factors(torch.eye(3), torch.full((2, 2), float("inf")), name="h.0.mlp.c_fc"), ValueError,
     r"eigen_factors: h.0.mlp.c_fc: S \(gradient covariance\) has non-finite values"),
    (lambda: influence.lambda_correction(A[0], S, Q_A, Q_S), ValueError, r"lambda_correction: a must be 3-D \(examples, tokens, d_in\), got shape \(4, 5\)"),
    (lambda: influence.lambda_correction(A, S[:, :3], Q_A, Q_S), ValueError, r"lambda_correction: a and s must have the same \(examples, tokens\)"),
    (lambda: influence.lambda_correction(A, S.double(), Q_A, Q_S), TypeError, r"lambda_correction: a and s must have the same dtype"),
    (lambda: influence.lambda_correction(A, S, Q_S, Q_S), ValueError, r"lambda_correction: Q_A must have shape \(5, 5\), got \(6, 6\)"),
    (lambda: influence.lambda_correction(A, S, Q_A, Q_S, MASK.T), ValueError, r"lambda_correction: mask must have shape \(3, 4\)"),
    (lambda: influence.lambda_correction(A[:0], S[:0], Q_A, Q_S), ValueError, r"lambda_correction: a and s hold no examples"),
    (lambda: influence.lambda_correction(NAN_A, S, Q_A, Q_S), ValueError, r"lambda_correction: a has non-finite values"),
    (lambda: influence.precondition(P, FACTORS, damping=0.0), ValueError, r"precondition: damping must be > 0, got 0.0"),
    (lambda: influence.precondition(P, FACTORS, damping=-1.0), ValueError, r"precondition: damping must be > 0, got -1.0"),
    (lambda: influence.precondition(P, FACTORS, damping="big"), TypeError, r"precondition: damping must be a float or None, got str"),
    (lambda: influence.precondition(P, (Q_A, Q_S, FACTORS.Lambda)), TypeError, r"precondition: factors must be EKFACFactors"),
    (lambda: influence.precondition(P.transpose(1, 2), FACTORS), ValueError, r"precondition: factors.Q_A must have shape \(6, 6\), got \(5, 5\)"),
    (lambda: influence.precondition(P[0], FACTORS, rank=2), ValueError, r"precondition: V must be 3-D \(queries, d_out, d_in\), got shape \(6, 5\)"),
    (lambda: influence.precondition(P, FACTORS, rank=0), ValueError, r"precondition: rank must be in \[1, inf\], got 0"),
    (lambda: influence.precondition(P, EKFACFactors(Q_A, Q_S, FACTORS.Lambda[:3])), ValueError, r"precondition: factors.Lambda must have shape \(6, 5\), got \(3, 5\)"),
    (lambda: influence.pairwise_scores(P[:, :4], A, S), ValueError, r"pairwise_scores: query must be \(queries, d_out=6, d_in=5\)"),
    (lambda: influence.pairwise_scores(LowRankQuery(torch.randn(2, 6, 3), torch.randn(2, 2, 5)), A, S), ValueError,
     r"pairwise_scores: query.right must have shape \(2, 3, d_in\)"),
    (lambda: influence.pairwise_scores(P.index_fill(0, torch.tensor([1]), float("nan")), A, S), ValueError, r"pairwise_scores: query has non-finite"),
    (lambda: influence.pairwise_scores(P, A, S, mask=MASK.float()[:2]), ValueError, r"pairwise_scores: mask must have shape \(3, 4\)"),
    (lambda: influence.pairwise_scores(LowRankQuery(torch.randn(2, 6, 3), torch.full((2, 3, 5), float("inf"))), A, S), ValueError,
     r"pairwise_scores: query.right has non-finite"),
    (lambda: influence.self_scores(A, S.clone().index_fill(1, torch.tensor([3]), float("nan")), FACTORS, mask=MASK), ValueError,
     r"self_scores: s has non-finite values"),  # also on masked tokens: padding must hold numbers
    (lambda: influence.precondition(P.index_fill(1, torch.tensor([0]), float("inf")), FACTORS), ValueError, r"precondition: V has non-finite"),
    (lambda: influence.self_scores(A, S, FACTORS, damping=0), ValueError, r"self_scores: damping must be > 0, got 0"),
    (lambda: influence.self_scores(A, S, FACTORS._replace(Q_S=Q_A)), ValueError, r"self_scores: factors.Q_S must have shape \(6, 6\), got \(5, 5\)"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_input_message(backend, index):
    call, error, message = BAD_CALLS[index]
    with pyfast.use_backend(backend), pytest.raises(error, match=message):
        call()


def test_wrong_device_is_named():
    meta = torch.randn(3, 4, 6, device="meta")
    with pytest.raises(ValueError, match=r"lambda_correction: all tensors must be on one device, got a on cpu, s on meta"):
        influence.lambda_correction(A, meta, Q_A, Q_S)


def test_kernel_backend_without_kernel_is_named():
    with pyfast.use_backend("cuda"), pytest.raises(RuntimeError, match=r"influence.pairwise_scores has no cuda kernel"):
        influence.pairwise_scores(P, A, S)
