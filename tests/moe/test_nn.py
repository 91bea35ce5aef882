"""SparseMoE: matches the reference ops, trains, compiles, balances with the routing bias."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close
from pyfast.moe.nn import PyramidMoE, SparseMoE, temperature_schedule


def _layer(**kwargs):
    torch.manual_seed(1)
    return SparseMoE(12, 10, 7, 2, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"router": "sigmoid_bias"}, {"capacity_factor": 0.5}, {"num_shared_experts": 2, "activation": "gelu"},
     {"residual": True, "temperature": 0.7}, {"router": "activated_softmax", "temperature": 0.5},
     {"router": "prototype", "prototype_scale": 4.0}, {"num_shared_experts": 1, "residual": True, "capacity_factor": 0.7}],
    ids=["softmax", "sigmoid_bias", "capacity", "shared", "residual", "activated", "prototype", "extras-capacity"],
)
def test_sparse_moe_matches_reference_ops(kwargs):
    layer = _layer(**kwargs)
    x = torch.randn(3, 11, 12)
    out, aux = layer(x)
    grads = torch.autograd.grad(out.square().sum() + sum(aux), [x for x in layer.parameters()])
    ref_layer = _layer(**kwargs).double()
    with pyfast.use_backend("reference"):
        ref_out, ref_aux = ref_layer(x.double())
        ref_grads = torch.autograd.grad(ref_out.square().sum() + sum(ref_aux), list(ref_layer.parameters()))
    assert out.shape == x.shape
    assert_close(out, ref_out, torch.float32, "out")
    for a, r in zip(aux, ref_aux):
        assert_close(a, r, torch.float32, "aux")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad")


def test_tiny_moe_language_model_learns():
    """Next-token prediction on a fixed random permutation of a 32-token vocabulary; the MoE layer
    is the only path from the embedding to the head."""
    torch.manual_seed(0)
    vocab, d = 32, 32
    successor = torch.randperm(vocab)
    embed = torch.nn.Embedding(vocab, d)
    moe = SparseMoE(d, 32, 4, 2)
    head = torch.nn.Linear(d, vocab)
    params = [*embed.parameters(), *moe.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        tokens = torch.randint(0, vocab, (8, 16))
        h = embed(tokens)
        y, aux = moe(h)
        logits = head(y)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), successor[tokens].reshape(-1))
        opt.zero_grad()
        (loss + 0.01 * aux.load_balancing).backward()
        opt.step()
        losses.append(loss.item())
    last = sum(losses[-5:]) / 5
    assert losses[0] > 3.0 and last < 0.3 * losses[0], (losses[0], last)


def test_sparse_moe_compiles_fullgraph_forward_backward():
    torch._dynamo.reset()
    layer = _layer(capacity_factor=1.5, num_shared_experts=1)
    x = torch.randn(2, 9, 12, requires_grad=True)

    def step(x):
        out, aux = layer(x)
        return out.square().mean() + aux.load_balancing + 1e-3 * aux.router_z

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, [x, *layer.parameters()])
    assert_close(loss, eager_loss, torch.float32)
    for g, r in zip(grads, eager_grads):
        assert_close(g, r, torch.float32)


def test_routing_bias_balances_load():
    layer = _layer(router="sigmoid_bias", bias_update_rate=0.05)
    with torch.no_grad():
        layer.gate.weight[0] += 1.0  # expert 0 wins most tokens
    x = torch.randn(256, 12).abs()

    def spread():
        layer.train()
        layer(x)
        counts = layer.expert_load.clone()
        layer.update_routing_bias()
        return (counts.max() - counts.min()).item()

    before = spread()
    for _ in range(30):
        after = spread()
    assert after < before
    assert layer.routing_bias[0] < 0 and not layer.routing_bias.requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"SparseMoE: router must be one of \('softmax', 'sigmoid_bias', 'activated_softmax', 'prototype'\), got 'top1'"):
        SparseMoE(8, 8, 4, 2, router="top1")
    with pytest.raises(ValueError, match=r"SparseMoE: k must be in \[1, 4\]"):
        SparseMoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match=r"SparseMoE: x must have d_model=8 features"):
        SparseMoE(8, 8, 4, 2)(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0"):
        SparseMoE(8, 8, 4, 2, capacity_factor=0.0)


def test_temperature_schedule_anneals_dense_to_sparse():
    temps = [temperature_schedule(s, 10, start=2.0, end=0.5) for s in range(12)]
    assert temps[0] == 2.0 and abs(temps[10] - 0.5) < 1e-12 and temps[11] == temps[10]
    assert all(a > b for a, b in zip(temps[:10], temps[1:11]))
    layer = _layer()
    x = torch.randn(64, 12)
    spread = []
    for t in (temps[0], temps[10]):
        logits = layer.gate(x)
        weights, _ = pyfast.moe.topk_gating(logits, 2, temperature=t)
        spread.append(weights.max(dim=-1).values.mean().item())
    assert spread[0] < spread[1]  # sharper (sparser) top-k weights at the low temperature
    with pytest.raises(ValueError, match="start and end must be > 0"):
        temperature_schedule(0, 10, end=0.0)


def test_pyramid_moe_layers():
    pyramid = PyramidMoE(12, 8, [3, 3, 6], k=1, capacity_factor=2.0)
    x = torch.randn(5, 12)
    assert [layer.num_experts for layer in pyramid] == [3, 3, 6]
    assert all(layer.coefficient is not None and layer.k == 1 for layer in pyramid)
    out, aux = pyramid[2](x)
    with pyfast.use_backend("reference"):
        ref, _ = pyramid[2](x)
    assert_close(out, ref, torch.float32)
    with pytest.raises(ValueError, match=r"PyramidMoE: num_experts must list"):
        PyramidMoE(12, 8, [])
