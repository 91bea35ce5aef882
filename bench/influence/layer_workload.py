"""Workloads of the influence benchmarks: one GPT-2-small MLP layer (768 -> 3072, bias as an input
column, sequences of 512 tokens; ``--quick``: 256 -> 1024, 128 tokens), its EK-FAC factors, and
kronfluence's own per-layer code at its default settings as a provider when it is installed.
"""
import functools
from typing import NamedTuple

import pytest
import torch

from pyfast.influence import EKFACFactors, reference

# (examples, tokens, d_in without the bias column, d_out)
FULL = (8, 512, 768, 3072)
QUICK = (4, 128, 256, 1024)


class Layer(NamedTuple):
    x: torch.Tensor  # (b, T, d_in) layer inputs
    a: torch.Tensor  # (b, T, d_in + 1) with the bias column
    s: torch.Tensor  # (b, T, d_out) output gradients
    factors: EKFACFactors  # float64, fitted on (a, s)
    eigen: reference.Eigen

    @property
    def sizes(self):
        b, T, d_in = self.a.shape
        return {"examples": b, "tokens": T, "d_in": d_in, "d_out": self.s.shape[-1], "dtype": "float32"}


def layer_shapes():
    return [pytest.param(FULL, marks=pytest.mark.large, id="gpt2-mlp-T512"), pytest.param(QUICK, id="quick-T128")]


@functools.lru_cache(maxsize=1)
def setup(shape, device) -> Layer:
    """Seeded float32 inputs and output gradients, and float64 factors fitted on them."""
    b, T, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, d_in, generator=g) + 0.1
    s = torch.randn(b, T, d_out, generator=g) / d_out**0.5
    a = reference.append_bias_column(x)
    eig = reference.eigen_factors(reference.covariance(a.double()), reference.covariance(s.double()))
    Lambda = reference.lambda_correction(a, s, eig.Q_A, eig.Q_S).double()
    factors = EKFACFactors(eig.Q_A, eig.Q_S, Lambda)
    to = lambda t: t.to(device)  # noqa: E731
    return Layer(to(x), to(a), to(s), EKFACFactors(*map(to, factors)), reference.Eigen(*map(to, eig)))


class Kronfluence:
    """kronfluence 1.0.1's per-layer stages on one tracked nn.Linear, fed the same cached inputs and
    output gradients: per-sample gradients (b, d_out, d_in + 1), then its Lambda update, its EK-FAC
    preconditioning, or its pairwise-score einsum. float32, its default dtypes."""

    def __init__(self, layer: Layer, damping: float):
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.module.linear import TrackedLinear
        from kronfluence.module.tracker.factor import LambdaTracker
        from kronfluence.utils import constants as names

        d_in, d_out = layer.x.shape[-1], layer.s.shape[-1]
        linear = torch.nn.Linear(d_in, d_out, device=layer.x.device)
        self.module = TrackedLinear("mlp.c_fc", linear, factor_args=FactorArguments(), score_args=ScoreArguments())
        self.names = names
        eig = layer.eigen
        storage = self.module.storage
        storage[names.ACTIVATION_EIGENVECTORS_NAME] = eig.Q_A.float()
        storage[names.ACTIVATION_EIGENVALUES_NAME] = eig.eigenvalues_A.float()
        storage[names.GRADIENT_EIGENVECTORS_NAME] = eig.Q_S.float()
        storage[names.GRADIENT_EIGENVALUES_NAME] = eig.eigenvalues_S.float()
        self.tracker = LambdaTracker(self.module)
        self.inverse = (1.0 / (layer.factors.Lambda + damping)).float()  # what kronfluence stores after fitting
        self.layer = layer

    def lambda_correction(self) -> torch.Tensor:
        storage, names = self.module.storage, self.names
        storage[names.LAMBDA_MATRIX_NAME] = None
        storage[names.NUM_LAMBDA_PROCESSED] = None
        self.tracker._update_lambda_matrix(self.module.compute_per_sample_gradient(self.layer.x, self.layer.s))
        return storage[names.LAMBDA_MATRIX_NAME] / storage[names.NUM_LAMBDA_PROCESSED].to(storage[names.LAMBDA_MATRIX_NAME].device)

    def _precondition(self, gradient: torch.Tensor) -> torch.Tensor:
        from kronfluence.factor.config import FactorConfig

        storage = dict(self.module.storage)
        storage[self.names.LAMBDA_MATRIX_NAME] = self.inverse
        return FactorConfig.CONFIGS[self.module.factor_args.strategy].precondition_gradient(gradient=gradient, storage=storage)

    def self_scores(self) -> torch.Tensor:
        G = self.module.compute_per_sample_gradient(self.layer.x, self.layer.s)
        return (self._precondition(G) * G).sum(dim=(1, 2))

    def pairwise_scores(self, query) -> torch.Tensor:
        self.module.einsum_path = None
        return self.module.compute_pairwise_score(query, self.layer.x, self.layer.s)
