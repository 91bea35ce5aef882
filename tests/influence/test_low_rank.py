"""Low-rank queries on a test model: rank-32 preconditioned query gradients rank the training
examples like the full-rank ones (Spearman > 0.9 for every query), a rank far below the
gradients' effective rank does not."""
import pytest
import torch

from pyfast import influence
from pyfast.influence import EKFACFactors, reference

scipy_stats = pytest.importorskip("scipy.stats")

WIDTH = 128


def _model():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1)]
    return torch.nn.Sequential(*layers).double()


def _tracked_layer_statistics(model, examples, tokens, seed):
    """Inputs (bias column appended) and output gradients of model[2] under a summed squared loss
    on a per-token regression target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, tokens, 16, generator=g, dtype=torch.float64)
    hidden = model[1](model[0](x))
    out = model[2](hidden)
    out.retain_grad()
    pred = model[4](model[3](out)).squeeze(-1)
    (pred - torch.sin(x.sum(dim=-1))).square().sum().backward()
    return reference.append_bias_column(hidden.detach()), out.grad.detach()


def test_rank_32_queries_rank_training_examples_like_full_rank():
    model = _model()
    a, s = _tracked_layer_statistics(model, 128, 16, seed=1)
    eig = influence.eigen_factors(influence.covariance(a), influence.covariance(s), name="2")
    factors = EKFACFactors(eig.Q_A, eig.Q_S, influence.lambda_correction(a, s, eig.Q_A, eig.Q_S))
    a_q, s_q = _tracked_layer_statistics(model, 6, 64, seed=2)
    query_grads = reference.per_example_gradients(a_q, s_q)
    full = influence.pairwise_scores(influence.precondition(query_grads, factors), a, s)

    def spearman(rank):
        scores = influence.pairwise_scores(influence.precondition(query_grads, factors, rank=rank), a, s)
        return [scipy_stats.spearmanr(full[q], scores[q]).statistic for q in range(full.shape[0])]

    assert min(spearman(32)) > 0.9
    assert min(spearman(8)) < 0.9  # the check can fail: a too-small rank loses the ranking
