"""Analyzer batching and memory controls: a Dataset batched per stage, query chunks, ``train_indices``,
chunk budgets, score dtypes, offloaded factors and per-layer scores all give the scores of the plain
run (float64); bad inputs get clear errors."""
import pytest
import torch
from torch.utils.data import TensorDataset

from pyfast import influence
from pyfast.influence import Analyzer, append_bias_column

F64 = torch.float64
N, QUERIES, T, D = 11, 5, 4, 3


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with non-finite statistics."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.GELU(), torch.nn.Linear(4, 2)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, T, D, generator=g, dtype=F64), torch.randn(n, T, 2, generator=g, dtype=F64)
    mask = torch.rand(n, T, generator=g) > 0.25
    mask[:, 0] = True
    return TensorDataset(x, y, mask)


def _loss(model, batch):
    x, y, mask = batch
    return ((model(x) - y).square().sum(-1) * mask).sum(), mask


@pytest.fixture(scope="module")
def fitted():
    """An Analyzer fitted on ready batches (the caller's batching), and its plain scores."""
    train, queries = _data(N, 1), _data(QUERIES, 2)
    analyzer = Analyzer(_model(), progress=False)
    analyzer.fit_factors([train[i : i + 4] for i in range(0, N, 4)], _loss)
    scores = analyzer.pairwise_scores([queries[:]], _loss, [train[:]], _loss, per_layer=True)
    self_influence = analyzer.self_scores([train[:]], _loss, per_layer=True)
    return analyzer, train, queries, scores, self_influence


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13)


def test_dataset_batch_sizes_per_stage(fitted):
    analyzer, train, queries, scores, self_influence = fitted
    other = Analyzer(analyzer.model, batch_size=3, progress=False)
    factors = other.fit_factors(train, _loss, covariance_batch_size=5, lambda_batch_size=2)
    for name in analyzer.names:
        for ours, theirs in zip(factors[name], analyzer.factors[name]):
            _close(ours, theirs)
    _close(other.pairwise_scores(queries, _loss, train, _loss, query_batch_size=2, train_batch_size=4), sum(scores.values()))
    _close(other.self_scores(train, _loss, batch_size=7), sum(self_influence.values()))


def test_train_indices_select_and_order(fitted):
    analyzer, train, queries, scores, self_influence = fitted
    indices = [7, 0, 3, 10, 3]  # TF-IDF-style candidates, any order, repeats allowed
    subset = analyzer.pairwise_scores(queries, _loss, train, _loss, train_indices=indices, train_batch_size=2)
    _close(subset, sum(scores.values())[:, indices])
    _close(analyzer.self_scores(train, _loss, train_indices=torch.tensor(indices)), sum(self_influence.values())[indices])


def test_per_layer_chunk_budget_and_low_rank(fitted):
    analyzer, train, queries, scores, _ = fitted
    small = Analyzer(analyzer.model, chunk_bytes=64, progress=False)
    small.factors = analyzer.factors
    per_layer = small.pairwise_scores(queries, _loss, train, _loss, per_layer=True)
    assert sorted(per_layer) == ["0", "2"]
    for name in per_layer:
        _close(per_layer[name], scores[name])
    P = small.query_gradients(queries, _loss, batch_size=2)
    assert sorted(P) == ["0", "2"] and P["0"].shape == (QUERIES, 4, D + 1)
    x, y, mask = train[:]
    with torch.no_grad():  # the head's inputs and output gradients by hand
        a = append_bias_column(analyzer.model[1](analyzer.model[0](x)))
        s = 2 * (analyzer.model(x) - y) * mask[..., None]
    _close(influence.pairwise_scores(P["2"], a, s, mask=mask), scores["2"])
    # Full rank in low-rank form equals the dense scores (d_out of the layers: 4 and 2).
    _close(analyzer.pairwise_scores(queries, _loss, train, _loss, rank=4), sum(scores.values()))


def test_score_dtype_and_offloaded_factors(tmp_path, fitted):
    analyzer, train, queries, scores, self_influence = fitted
    path = str(tmp_path / "factors.safetensors")
    analyzer.save_factors(path)
    low = Analyzer(analyzer.model, score_dtype=torch.float32, offload_factors=True, progress=False)
    low.load_factors(path)
    assert all(t.device.type == "cpu" for f in low.factors.values() for t in f)
    pairwise = low.pairwise_scores(queries, _loss, train, _loss)
    assert pairwise.dtype == torch.float32
    expected = sum(scores.values())
    assert float((pairwise.double() - expected).norm() / expected.norm()) < 1e-5
    selfs = low.self_scores(train, _loss)
    assert selfs.dtype == torch.float32
    torch.testing.assert_close(selfs.double(), sum(self_influence.values()), rtol=1e-4, atol=0)


def _nan_loss(model, batch):
    x, y, mask = batch
    h = _NaNGradient.apply(model[0](x))
    return (model[2](model[1](h)) - y).square().sum()


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def _empty():
    yield from ()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda a, d: a.fit_factors(TensorDataset(torch.zeros(0, 3)), _loss), ValueError, r"Analyzer.fit_factors: the data is empty"),
        (lambda a, d: a.fit_factors(_empty(), _loss), ValueError, r"Analyzer: the data for covariance yielded no batch"),
        (lambda a, d: a.self_scores(d, _loss, train_indices=[0, 11]), ValueError,
         r"Analyzer \(self scores\): train_indices must lie in \[0, 11\), got values in \[0, 11\]"),
        (lambda a, d: a.self_scores(d, _loss, train_indices=[]), ValueError, r"Analyzer \(self scores\): train_indices is empty"),
        (lambda a, d: a.self_scores(d, _loss, train_indices=[0.5]), TypeError, r"train_indices must be integers, got torch.float32"),
        (lambda a, d: a.self_scores([d[:]], _loss, train_indices=[0]), TypeError,
         r"Analyzer \(self scores\): train_indices needs a map-style torch.utils.data.Dataset, got list"),
        (lambda a, d: a.self_scores([d[:]], _loss, batch_size=2), TypeError, r"batch sizes apply to a Dataset; list yields ready batches"),
        (lambda a, d: a.self_scores(d, _loss, batch_size=0), ValueError, r"Analyzer \(self scores\): batch_size must be in \[1, inf\], got 0"),
        (lambda a, d: a.fit_factors(d, _nan_loss), ValueError,
         r"Analyzer: layer '0': covariance: x has non-finite values"),
        (lambda a, d: a.fit_factors(d, lambda m, b: (_loss(m, b)[0], b[2][:, :2])), ValueError,
         r"Analyzer: train_loss's mask must have shape \(5, 4\) \(examples, tokens\) of layer '0', got \(5, 2\)"),
        (lambda a, d: a.fit_factors(d, lambda m, b: torch.tensor(1.0, dtype=F64, requires_grad=True) * 2), ValueError,
         r"Analyzer: tracked layers \['0', '2'\] saw no forward pass"),
        (lambda a, d: a.fit_factors(d, lambda m, b: _loss(m, b)[0] * float("inf")), ValueError, r"train_loss returned a non-finite loss \(inf\)"),
    ],
)
def test_bad_input(fitted, call, error, message):
    analyzer = Analyzer(_model(), batch_size=5, progress=False)
    analyzer.factors = fitted[0].factors
    with pytest.raises(error, match=message):
        call(analyzer, _data(N, 1))


def test_bad_constructor_arguments():
    model = _model()
    with pytest.raises(ValueError, match=r"Analyzer: damping must be > 0 or None, got -1"):
        Analyzer(model, damping=-1)
    with pytest.raises(TypeError, match=r"Analyzer: damping must be a float or None, got str"):
        Analyzer(model, damping="0.1")
    with pytest.raises(TypeError, match=r"Analyzer: an IterableDataset cannot be batched by index; pass a DataLoader over it"):
        Analyzer(model).fit_factors(_Stream(), _loss)
    with pytest.raises(TypeError, match=r"Analyzer: score_dtype must be a floating torch.dtype or None, got torch.int32"):
        Analyzer(model, score_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"Analyzer: chunk_bytes must be in \[1, inf\], got 0"):
        Analyzer(model, chunk_bytes=0)
    with pytest.raises(ValueError, match=r"Analyzer: model has no layer to track"):
        Analyzer(torch.nn.Sequential(torch.nn.Tanh()))
    with pytest.raises(RuntimeError, match=r"Analyzer: no factors; call fit_factors or load_factors first"):
        Analyzer(model).self_scores(_data(2, 0), _loss)
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"Analyzer: the output of layer '0' does not require grad"):
        Analyzer(frozen, progress=False).fit_factors([_data(2, 0)[:]], _loss)
