"""EK-FAC influence functions (Grosse et al. 2023): per tracked linear layer,

    A = covariance(a, mask); S = covariance(s, mask)              # factor statistics
    eig = eigen_factors(A, S, name="mlp.fc1")                      # float64 eigenbases
    Lam = lambda_correction(a, s, eig.Q_A, eig.Q_S, mask)          # eigenvalue correction
    factors = EKFACFactors(eig.Q_A, eig.Q_S, Lam)
    P = precondition(query_gradients, factors)                     # H^-1 g_q, (q, d_out, d_in)
    scores = pairwise_scores(P, a_train, s_train, mask=mask)       # (q, b)
    self_influence = self_scores(a_train, s_train, factors)        # (b,)

``a`` are the layer inputs (with `append_bias_column` when the layer has a bias), ``s`` the
gradients of the summed training loss w.r.t. the layer outputs.
"""
from . import reference
from .analyzer import Analyzer
from .factors import EKFACFactors, Eigen, LowRankQuery
from .ops import covariance, eigen_factors, lambda_correction, pairwise_scores, precondition, self_scores
from .reference import append_bias_column, default_damping

__all__ = [
    "Analyzer",
    "EKFACFactors",
    "Eigen",
    "LowRankQuery",
    "append_bias_column",
    "covariance",
    "default_damping",
    "eigen_factors",
    "lambda_correction",
    "pairwise_scores",
    "precondition",
    "reference",
    "self_scores",
]
