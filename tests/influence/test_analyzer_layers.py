"""Analyzer on nn.Conv2d (patches as tokens) and Hugging Face Conv1D layers, float64, against the
explicit reference: patches extracted by loops (not `unfold`), output gradients by `retain_grad`,
per-example gradients by autograd one example at a time (`influence_inputs.explicit_influence`)."""
import pytest
import torch
import torch.nn.functional as F

from influence_inputs import explicit_influence
from pyfast.influence import Analyzer, reference

F64 = torch.float64


def _patches(x, conv):
    """``(n, H' W', C kh kw [+ 1])`` input patches of ``conv`` by explicit loops over output pixels."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = (0, 0) if conv.padding == "valid" else conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            patch = torch.stack([xp[:, :, i * sh + u * dh, j * sw + v * dw] for u in range(kh) for v in range(kw)], dim=-1)
            rows.append(patch.reshape(x.shape[0], -1))
    a = torch.stack(rows, dim=1)
    return reference.append_bias_column(a) if conv.bias is not None else a


def _tokens(z):
    """``(n, C, H, W) -> (n, H W, C)``."""
    return z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(3, 4, (2, 3), dilation=(1, 2), padding="valid", bias=False)
        self.head = torch.nn.Linear(12, 2)

    def forward(self, x, keep=None):
        z1 = self.conv1(x)
        h1 = torch.tanh(z1)
        z2 = self.conv2(h1)
        out = self.head(z2.flatten(1))
        if keep is not None:
            keep.update(x=x, z1=z1, h1=h1, z2=z2, h2=z2.flatten(1), out=out)
            for t in (z1, z2, out):
                t.retain_grad()
        return out


def _conv_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 7, 9, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)


def _conv_loss(model, batch):
    x, y = batch
    return (model(x) - y).square().sum()


def _conv_gradients(model, x, y):
    out = {"conv1": [], "conv2": [], "head": []}
    for n in range(len(x)):
        model.zero_grad()
        _conv_loss(model, (x[n : n + 1], y[n : n + 1])).backward()
        out["conv1"].append(torch.cat([model.conv1.weight.grad.reshape(3, -1), model.conv1.bias.grad[:, None]], dim=1))
        out["conv2"].append(model.conv2.weight.grad.reshape(4, -1).clone())
        out["head"].append(torch.cat([model.head.weight.grad, model.head.bias.grad[:, None]], dim=1))
    return {k: torch.stack(v) for k, v in out.items()}


def test_conv2d_matches_explicit_reference():
    torch.manual_seed(0)
    model = _ConvNet().double()
    train, queries = _conv_data(9, 1), _conv_data(3, 2)
    keep = {}
    x, y = train
    (model(x, keep) - y).square().sum().backward()
    stats = {
        "conv1": (_patches(x, model.conv1), _tokens(keep["z1"].grad)),
        "conv2": (_patches(keep["h1"].detach(), model.conv2), _tokens(keep["z2"].grad)),
        "head": (reference.append_bias_column(keep["h2"].detach())[:, None], keep["out"].grad[:, None]),
    }
    lambdas, pairwise, self_influence = explicit_influence(stats, _conv_gradients(model, *train), _conv_gradients(model, *queries))

    analyzer = Analyzer(model, progress=False)
    assert analyzer.names == ["conv1", "conv2", "head"]
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 9, 4)]
    factors = analyzer.fit_factors(batches, _conv_loss)
    for name, Lambda in lambdas.items():
        torch.testing.assert_close(factors[name].Lambda, Lambda, rtol=1e-10, atol=1e-14)
    scores = analyzer.pairwise_scores([queries], _conv_loss, batches, _conv_loss)
    torch.testing.assert_close(scores, pairwise, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(analyzer.self_scores(batches, _conv_loss), self_influence, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "conv, message",
    [
        (torch.nn.Conv2d(4, 4, 3, groups=2), r"conv \(grouped nn.Conv2d \(groups=2\)\)"),
        (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"conv \(nn.Conv2d with padding_mode='reflect'\)"),
        (torch.nn.Conv2d(4, 4, 2, padding="same"), r"conv \(nn.Conv2d with padding='same' and an even receptive field"),
    ],
)
def test_unsupported_conv_is_named(conv, message):
    model = torch.nn.Sequential()
    model.add_module("conv", conv)
    with pytest.raises(ValueError, match=r"Analyzer: unsupported layers " + message):
        Analyzer(model)


def test_conv2d_same_padding_and_unbatched_input():
    conv = torch.nn.Conv2d(2, 3, 3, padding="same").double()
    analyzer = Analyzer(torch.nn.Sequential(conv), progress=False)
    x = torch.randn(2, 2, 5, 4, dtype=F64)
    # 'same' padding with an odd kernel is symmetric: the patches are those of padding=1.
    analyzer.fit_factors([x], lambda m, b: m(b).square().sum())
    explicit = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    explicit.load_state_dict(conv.state_dict())
    a = _patches(x, explicit)
    s = _tokens(2 * conv(x).detach())
    stats = {"0": (a, s)}
    G = torch.einsum("bto,bti->boi", s, a)
    lambdas, _, _ = explicit_influence(stats, {"0": G}, {"0": G})
    torch.testing.assert_close(analyzer.factors["0"].Lambda, lambdas["0"], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match=r"Analyzer: nn.Conv2d inputs must be 4-D \(batch, channels, height, width\), got shape \(2, 5, 4\)"):
        analyzer.fit_factors([x[0]], lambda m, b: m(b).square().sum())


def test_hf_conv1d_matches_explicit_reference():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="transformers is a test dependency")
    Conv1D = pytorch_utils.Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(5, 4), torch.nn.Tanh(), Conv1D(3, 5)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 6, 4, generator=g, dtype=F64), torch.randn(7, 6, 3, generator=g, dtype=F64)
    mask = torch.rand(7, 6, generator=g) > 0.3
    xq, yq, mq = x[:3] * 0.5, y[:3] + 0.1, mask[:3]

    def loss(model, batch):
        x, y, m = batch
        return ((model(x) - y).square().sum(-1) * m).sum(), m

    def gradients(x, y, m):
        out = {"0": [], "2": []}
        for n in range(len(x)):
            model.zero_grad()
            loss(model, (x[n : n + 1], y[n : n + 1], m[n : n + 1]))[0].backward()
            for name in out:  # Conv1D's weight is (d_in, d_out): G = [W.grad^T | b.grad]
                layer = model[int(name)]
                out[name].append(torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], dim=1))
        return {k: torch.stack(v) for k, v in out.items()}

    z1 = model[0](x)
    h1 = model[1](z1)
    z2 = model[2](h1)
    z1.retain_grad(), z2.retain_grad()
    ((z2 - y).square().sum(-1) * mask).sum().backward()
    stats = {"0": (reference.append_bias_column(x), z1.grad), "2": (reference.append_bias_column(h1.detach()), z2.grad)}
    lambdas, pairwise, self_influence = explicit_influence(stats, gradients(x, y, mask), gradients(xq, yq, mq), mask)

    analyzer = Analyzer(model, progress=False)
    assert analyzer.names == ["0", "2"]
    batches = [(x[i : i + 3], y[i : i + 3], mask[i : i + 3]) for i in range(0, 7, 3)]
    factors = analyzer.fit_factors(batches, loss)
    for name, Lambda in lambdas.items():
        torch.testing.assert_close(factors[name].Lambda, Lambda, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(analyzer.pairwise_scores([(xq, yq, mq)], loss, batches, loss), pairwise, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(analyzer.self_scores(batches, loss), self_influence, rtol=1e-9, atol=1e-12)
