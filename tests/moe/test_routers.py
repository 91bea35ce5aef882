"""Routers beyond top-k gating (activation dense-to-sparse gate, ProMoE, Read-ME pre-gating) and the
single-call shared / residual experts: against the float64 specifications in `pyfast.moe.reference`."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close
from moe_inputs import random_experts
from pyfast.moe import reference, routers
from pyfast.moe.nn import PreGatingRouter, SparseMoE, temperature_schedule

D, FFN, E, K = 12, 10, 7, 2


def _grads(out, inputs):
    cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * cot).sum(), inputs)


# --------------------------------------------------------------------------------------------------
# activation dense-to-sparse gate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", routers.GATE_ACTIVATIONS)
@pytest.mark.parametrize("T", [0, 1, 13])
def test_activated_gating_matches_reference(activation, T):
    scores = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(E, dtype=torch.float64, requires_grad=True)
    logits = routers.activated_logits(scores.float(), activation, offset.float())
    weights, experts = pyfast.moe.topk_gating(logits, K, temperature=0.6)
    ref_w, ref_e = reference.activated_gating(scores, K, activation=activation, offset=offset, temperature=0.6)
    assert torch.equal(experts, ref_e)
    assert_close(weights, ref_w, torch.float32, "weights")
    if T:
        got = _grads(weights, [scores, offset])
        want = _grads(ref_w, [scores, offset])
        for g, w in zip(got, want):
            assert_close(g, w, torch.float32, "grad")
        spec = lambda s, o: reference.activated_gating(s, K, activation=activation, offset=o, temperature=0.6)[0]  # noqa: E731
        assert torch.autograd.gradcheck(spec, (scores, offset))


def test_activated_gate_follows_the_temperature_schedule():
    layer = SparseMoE(D, FFN, E, K, router="activated_softmax", gate_activation="sigmoid")
    x = torch.randn(64, D)
    peaks = []
    for step in (0, 10):
        layer.temperature = temperature_schedule(step, 10, start=2.0, end=0.05)
        weights = layer.route(x).weights
        peaks.append(weights.max(dim=-1).values.mean().item())
    assert peaks[0] < peaks[1]  # dense early, sparse late


# --------------------------------------------------------------------------------------------------
# ProMoE: prototypical routing and the routing contrastive loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 17])
def test_prototype_gating_matches_reference(T):
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    p = torch.randn(E, D, dtype=torch.float64, requires_grad=True)
    scores = routers.prototype_scores(x.float(), p.float(), 3.0)
    weights, experts = routers.prototype_topk(scores, K)
    ref_scores, ref_w, ref_e = reference.prototype_gating(x, p, K, scale=3.0)
    assert torch.equal(experts, ref_e)
    assert_close(scores, ref_scores, torch.float32, "scores")
    for g, w in zip(_grads(weights, [x, p]), _grads(ref_w, [x, p])):
        assert_close(g, w, torch.float32, "grad")


@pytest.mark.parametrize("T,masked", [(0, False), (1, False), (9, False), (23, True)])
def test_routing_contrastive_loss_matches_reference(T, masked):
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    p = torch.randn(E, D, dtype=torch.float64, requires_grad=True)
    experts = random_experts(T, E, K, skew=True)  # skewed: some experts get no token
    mask = torch.rand(T) > 0.3 if masked else torch.ones(T, dtype=torch.bool)
    loss = routers.routing_contrastive_loss(x, experts, p, 0.2, mask)
    ref = reference.routing_contrastive_loss(x, experts, p, 0.2, mask)
    assert_close(loss, ref, torch.float64, "loss")
    got = torch.autograd.grad(loss, [x, p])
    want = torch.autograd.grad(ref, [x, p], allow_unused=True)
    for g, w in zip(got, want):
        assert_close(g, torch.zeros_like(g) if w is None else w, torch.float64, "grad")
    if T:
        assert loss > 0
        assert torch.autograd.gradcheck(lambda a, b: reference.routing_contrastive_loss(a, experts, b, 0.2, mask), (x, p))


def test_routing_contrastive_loss_pulls_prototypes_to_their_tokens():
    """A prototype at its tokens' centroid and away from the others gives a lower loss."""
    centroids = torch.eye(3, D, dtype=torch.float64) * 5
    x = centroids.repeat_interleave(4, dim=0) + 0.1 * torch.randn(12, D, dtype=torch.float64)
    experts = torch.arange(3).repeat_interleave(4)[:, None]
    mask = torch.ones(12, dtype=torch.bool)
    aligned = routers.routing_contrastive_loss(x, experts, centroids, 0.1, mask)
    shuffled = routers.routing_contrastive_loss(x, experts, centroids.roll(1, dims=0), 0.1, mask)
    assert aligned < 0.01 < shuffled


def test_promoe_layer_matches_the_two_step_specification():
    """Conditional routing (a caller's mask) then prototypical routing, in float64 against the spec."""
    torch.manual_seed(3)
    layer = SparseMoE(D, FFN, E, K, router="prototype", num_unconditional_experts=1, num_shared_experts=1,
                      prototype_scale=4.0, contrastive_temperature=0.3, dtype=torch.float64)
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    unconditional = torch.zeros(2, 9, dtype=torch.bool)
    unconditional[1] = True  # the second sample is the null-conditioned (CFG) copy
    out, aux = layer(x, unconditional=unconditional)

    flat, u = x.reshape(-1, D), unconditional.reshape(-1)
    scores, weights, experts = reference.prototype_gating(flat, layer.prototypes, K, scale=4.0)
    slot_weights = torch.tensor([1.0, 0.0], dtype=torch.float64)  # unconditional expert in slot 0
    weights = torch.where(u[:, None], slot_weights, weights)
    routed = torch.where(u[:, None], torch.full_like(experts, E), experts)
    shared = torch.full_like(experts[:, :1], E + 1)
    ref = reference.moe_mlp(
        flat, layer.w_gate_up, layer.w_down, torch.cat([weights, torch.ones_like(weights[:, :1])], 1),
        torch.cat([routed, shared], 1),
    )
    ref_rcl = reference.routing_contrastive_loss(flat, experts, layer.prototypes, 0.3, ~u)
    assert_close(out.reshape(-1, D), ref, torch.float64, "out")
    assert_close(aux.routing_contrastive, ref_rcl, torch.float64, "routing contrastive loss")
    params = [x, layer.prototypes, layer.w_gate_up, layer.w_down]
    got = torch.autograd.grad((out.reshape(-1, D) * ref.detach()).sum() + aux.routing_contrastive, params)
    want = torch.autograd.grad((ref * ref.detach()).sum() + ref_rcl, params)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64, "grad")


# --------------------------------------------------------------------------------------------------
# Read-ME pre-gating
# --------------------------------------------------------------------------------------------------


def test_pre_gated_layer_equals_the_layer_run_with_the_same_decision():
    torch.manual_seed(4)
    router = PreGatingRouter(D, E, K, num_layers=2, temperature=0.8)
    layers = [SparseMoE(D, FFN, E, K, temperature=0.8, num_shared_experts=1) for _ in range(2)]
    h = torch.randn(3, 5, D)
    decisions = router(h)
    assert len(decisions) == 2
    for i, (layer, decision) in enumerate(zip(layers, decisions)):
        x = torch.randn(3, 5, D)
        pre_gated, pre_aux = layer(x, decision=decision)
        with torch.no_grad():  # the layer's own router, set to compute the same decision from h
            layer.gate.weight.copy_(router.gate.weight[i * E:(i + 1) * E])
        own = layer.route(h.reshape(-1, D))
        assert torch.equal(own.experts, decision.experts)
        same, aux = layer(x, decision=own)
        assert_close(pre_gated, same, torch.float32, "out")
        for a, b in zip(pre_aux, aux):
            assert_close(a, b, torch.float32, "aux")
        flat = x.reshape(-1, D)
        ref = reference.moe_mlp(flat, layer.w_gate_up[:E], layer.w_down[:E], decision.weights, decision.experts)
        ref = ref + reference.moe_mlp(flat, layer.w_gate_up[E:], layer.w_down[E:], torch.ones(15, 1),
                                      torch.zeros(15, 1, dtype=torch.int32))
        assert_close(pre_gated.reshape(-1, D), ref, torch.float32, "out vs reference")
    grad = torch.autograd.grad(layers[0](h, decision=decisions[0])[0].square().sum(), router.gate.weight)[0]
    assert grad[:E].abs().sum() > 0 and grad[E:].abs().sum() == 0


def test_batch_by_expert_groups_tokens():
    experts = random_experts(11, E, K, skew=True)
    batches = routers.batch_by_expert(experts, E)
    for e in range(E):
        tokens = batches.tokens[batches.offsets[e]:batches.offsets[e + 1]]
        want = torch.where((experts == e).any(dim=1))[0]
        assert torch.equal(tokens.sort().values, want)
        assert bool(batches.touched[e]) == (want.numel() > 0)
    assert not batches.touched.all()


def test_bad_router_arguments():
    layer = SparseMoE(D, FFN, E, K)
    x = torch.randn(4, D)
    decision = PreGatingRouter(D, E + 1, K)(x)[0]
    with pytest.raises(ValueError, match=r"SparseMoE: decision must hold weights \(4, 2\), experts \(4, 2\) and logits \(4, 7\)"):
        layer(x, decision=decision)
    with pytest.raises(TypeError, match="decision must be a RoutingDecision, got tuple"):
        layer(x, decision=(decision.weights, decision.experts, decision.logits[:, :E]))
    with pytest.raises(ValueError, match="unconditional needs num_unconditional_experts > 0"):
        layer(x, unconditional=torch.zeros(4, dtype=torch.bool))
    promoe = SparseMoE(D, FFN, E, K, router="prototype", num_unconditional_experts=1)
    with pytest.raises(ValueError, match=r"unconditional must be a bool mask of shape \(4,\), got torch.int64 \(4,\)"):
        promoe(x, unconditional=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_unconditional_experts needs router='prototype'"):
        SparseMoE(D, FFN, E, K, num_unconditional_experts=1)
    with pytest.raises(ValueError, match=r"num_unconditional_experts must be in \[0, 2\]"):
        SparseMoE(D, FFN, E, K, router="prototype", num_unconditional_experts=3)
    with pytest.raises(ValueError, match=r"gate_activation must be one of \('tanh', 'sigmoid'\), got 'relu'"):
        SparseMoE(D, FFN, E, K, router="activated_softmax", gate_activation="relu")
    with pytest.raises(ValueError, match="contrastive_temperature must be > 0"):
        SparseMoE(D, FFN, E, K, router="prototype", contrastive_temperature=0.0)
    with pytest.raises(ValueError, match=r"PreGatingRouter: h must have d_model=12"):
        PreGatingRouter(D, E, K)(torch.randn(3, D + 1))


# --------------------------------------------------------------------------------------------------
# shared and residual experts in the routed experts' moe_mlp call
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"num_shared_experts": 2}, {"residual": True, "k": 1},
                                    {"num_shared_experts": 1, "residual": True, "activation": "gelu"}],
                         ids=["shared", "residual", "both"])
def test_single_call_extras_equal_the_two_pass_result(kwargs):
    torch.manual_seed(5)
    kwargs = {"k": K, **kwargs}
    layer = SparseMoE(D, FFN, E, kwargs.pop("k"), **kwargs)
    x = torch.randn(19, D)
    folded, _ = layer(x)  # one moe_mlp call: extras are always-selected choices
    grads = _grads(folded, list(layer.parameters()))
    layer.capacity_factor = 100.0  # keeps every assignment but takes the two-pass path
    two_pass, _ = layer(x)
    assert_close(folded, two_pass, torch.float32, "out")
    for g, w in zip(grads, _grads(two_pass, list(layer.parameters()))):
        assert_close(g, w, torch.float32, "grad")


@pytest.mark.parametrize("case", ["activated", "prototype", "pre_gated", "extras"])
def test_new_routers_compile_fullgraph(case):
    torch._dynamo.reset()
    torch.manual_seed(6)
    kwargs = {
        "activated": dict(router="activated_softmax", temperature=0.7),
        "prototype": dict(router="prototype", num_unconditional_experts=1),
        "pre_gated": dict(),
        "extras": dict(num_shared_experts=1, residual=True),
    }[case]
    layer = SparseMoE(D, FFN, E, K, **kwargs)
    router = PreGatingRouter(D, E, K)
    x = torch.randn(2, 7, D, requires_grad=True)
    mask = torch.arange(14).reshape(2, 7) % 3 == 0

    def step(x):
        extra = {"unconditional": mask} if case == "prototype" else {}
        if case == "pre_gated":
            extra["decision"] = router(x)[0]
        out, aux = layer(x, **extra)
        return out.square().mean() + aux.load_balancing + aux.routing_contrastive

    params = [x, *layer.parameters(), *router.parameters()]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    eager = step(x)
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)
    assert_close(loss, eager, torch.float32)
    for g, r in zip(grads, eager_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert_close(g, r, torch.float32)
