"""Analyzer on a tiny float64 MLP against the explicit reference: eigenbases from hand-collected
layer statistics, Lambda and scores from per-example autograd gradients and a dense inverse-Hessian
solve (`influence_inputs.explicit_influence`)."""
import pytest
import torch

from influence_inputs import explicit_influence
from pyfast.influence import Analyzer, reference

safetensors = pytest.importorskip("safetensors")

D_IN, HIDDEN, D_OUT = 4, 6, 3


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, D_OUT, bias=False)).double()


def _data(n, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, D_IN) if tokens is None else (n, tokens, D_IN)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(*shape[:-1], D_OUT, generator=g, dtype=torch.float64)
    mask = None if tokens is None else torch.rand(n, tokens, generator=g) > 0.3
    return x, y, mask


def _batches(x, y, mask, size):
    return [(x[i : i + size], y[i : i + size], None if mask is None else mask[i : i + size]) for i in range(0, len(x), size)]


def summed_loss(model, batch):
    x, y, mask = batch
    per_token = (model(x) - y).square().sum(dim=-1)
    if mask is None:
        return per_token.sum()
    return (per_token * mask).sum(), mask


def _example_gradients(model, x, y, mask):
    """Explicit per-example gradients of each Linear's [W | b] (autograd, one example at a time)."""
    grads = {"0": [], "2": []}
    for n in range(len(x)):
        model.zero_grad()
        loss = summed_loss(model, (x[n : n + 1], y[n : n + 1], None if mask is None else mask[n : n + 1]))
        (loss[0] if isinstance(loss, tuple) else loss).backward()
        grads["0"].append(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1))
        grads["2"].append(model[2].weight.grad.clone())
    return {k: torch.stack(v) for k, v in grads.items()}


def _layer_statistics(model, x, y, mask):
    """(a, s) of each Linear over the whole data set, collected by hand."""
    h_in = x
    z = model[0](h_in)
    z.retain_grad()
    h = model[1](z)
    out = model[2](h)
    out.retain_grad()
    per_token = (out - y).square().sum(dim=-1)
    (per_token if mask is None else per_token * mask).sum().backward()
    lift = (lambda t: t.unsqueeze(1)) if x.dim() == 2 else (lambda t: t)
    return {"0": (lift(reference.append_bias_column(h_in)), lift(z.grad)), "2": (lift(h.detach()), lift(out.grad))}


@pytest.mark.parametrize("tokens", [None, 5])
def test_analyzer_matches_explicit_reference(tmp_path, tokens):
    model = _mlp()
    train, queries = _data(13, 1, tokens), _data(3, 2, tokens)
    analyzer = Analyzer(model, progress=False)
    assert analyzer.names == ["0", "2"]
    factors = analyzer.fit_factors(_batches(*train, 4), summed_loss)

    grads, query_grads = _example_gradients(model, *train), _example_gradients(model, *queries)
    lambdas, expected_scores, expected_self = explicit_influence(_layer_statistics(model, *train), grads, query_grads, train[2])
    for name, Lambda in lambdas.items():
        torch.testing.assert_close(factors[name].Lambda, Lambda, rtol=1e-10, atol=1e-14)

    scores = analyzer.pairwise_scores(_batches(*queries, 2), summed_loss, _batches(*train, 5), summed_loss)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(analyzer.self_scores(_batches(*train, 6), summed_loss), expected_self, rtol=1e-9, atol=1e-12)

    path = str(tmp_path / "factors.safetensors")
    analyzer.save_factors(path)
    reloaded = Analyzer(model, progress=False)
    reloaded.load_factors(path)
    per_layer = reloaded.pairwise_scores(_batches(*queries, 3), summed_loss, _batches(*train, 13), summed_loss, per_layer=True)
    torch.testing.assert_close(sum(per_layer.values()), expected_scores, rtol=1e-9, atol=1e-12)


def test_analyzer_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"Analyzer: unsupported layers 1 \(Conv1d\); supported: nn.Linear, transformers Conv1D"):
        Analyzer(model, modules=["0", "1"])
    with pytest.raises(ValueError, match=r"Analyzer: modules \['fc9'\] are not in the model"):
        Analyzer(model, modules=["fc9"])
    with pytest.raises(ValueError, match=r"Analyzer: damping must be > 0 or None, got 0"):
        Analyzer(model, damping=0)
    analyzer = Analyzer(_mlp(), progress=False)
    with pytest.raises(ValueError, match=r"Analyzer.fit_factors: the data is empty"):
        analyzer.fit_factors([], summed_loss)
    nan_batch = [(torch.full((2, D_IN), float("nan"), dtype=torch.float64), torch.zeros(2, D_OUT, dtype=torch.float64), None)]
    with pytest.raises(ValueError, match=r"Analyzer: train_loss returned a non-finite loss"):
        analyzer.fit_factors(nan_batch, summed_loss)
    with pytest.raises(RuntimeError, match=r"Analyzer: no factors; call fit_factors or load_factors first"):
        analyzer.self_scores(_batches(*_data(2, 0), 2), summed_loss)
    x, y, mask = _data(4, 0, tokens=3)
    with pytest.raises(ValueError, match=r"Analyzer: train_loss's mask must have shape \(4, 3\) \(examples, tokens\) of layer '0', got \(4, 2\)"):
        analyzer.fit_factors([(x, y, mask[:, :2])], lambda m, b: (summed_loss(m, (b[0], b[1], None)), b[2]))
