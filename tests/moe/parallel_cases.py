"""Per-rank checks of expert parallelism, run in processes spawned by test_parallel.py (a module of
its own so that the spawned processes can import it): each rank's output and gradients equal those
of the single-process `moe_mlp` / `SparseMoE` with the full weight set (float64, within 1e-10)."""
import pytest
import torch
import torch.distributed as dist

from pyfast.moe import expert_parallel_mlp, expert_shard, moe_mlp, route
from pyfast.moe.nn import SparseMoE

D, FFN, E, K = 6, 5, 8, 2
ATOL = 1e-10


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def _rank_inputs(rank, tokens, high, seed):
    """One rank's tokens, gate weights, expert ids in [0, high) and output cotangent."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    weights = torch.rand(tokens, K, generator=g, dtype=torch.float64) + 0.1
    experts = torch.stack([torch.randperm(high, generator=g)[:K] for _ in range(tokens)]) if tokens else torch.zeros(0, K, dtype=torch.int64)
    return x, weights, experts, torch.randn(tokens, D, generator=g, dtype=torch.float64)


def _check_mlp(ranks, group, *, tokens_of, high, activation, capacity, seed):
    """expert_parallel_mlp on this rank of ``group`` (global ``ranks``) vs moe_mlp on every rank's
    tokens with the full weights; ``tokens_of(rank in group)`` tokens per rank, expert ids below
    ``high(group size)``."""
    me, world = ranks.index(dist.get_rank()), len(ranks)
    g = torch.Generator().manual_seed(seed)
    width = 2 * FFN if activation == "swiglu" else FFN
    w1 = torch.randn(E, width, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, D, FFN, generator=g, dtype=torch.float64)
    start, local = expert_shard(E, group)
    assert (start, local) == (me * E // world, E // world)
    w1_local = w1[start:start + local].clone().requires_grad_()
    w2_local = w2[start:start + local].clone().requires_grad_()
    x, weights, experts, cot = _rank_inputs(ranks[me], tokens_of(me), high(world), seed)
    x.requires_grad_(), weights.requires_grad_()
    out = expert_parallel_mlp(x, w1_local, w2_local, weights, experts, group, activation=activation, capacity=capacity)
    grads = torch.autograd.grad((out * cot).sum(), [x, weights, w1_local, w2_local])

    w1.requires_grad_(), w2.requires_grad_()
    total = 0
    for r in range(world):
        xr, wr, er, cr = _rank_inputs(ranks[r], tokens_of(r), high(world), seed)
        xr.requires_grad_(), wr.requires_grad_()
        ref = moe_mlp(xr, w1, w2, wr, er, activation=activation, capacity=capacity)
        total = total + (ref * cr).sum()
        if r == me:
            ref_out, mine = ref, (xr, wr)
    ref_grads = torch.autograd.grad(total, [*mine, w1, w2])
    _close(out, ref_out, "out")
    for got, want, name in zip(grads, ref_grads, ["x", "weights", "w_gate_up", "w_down"]):
        if name.startswith("w_"):
            want = want[start:start + local]
        _close(got, want, f"grad {name}")


def _check_layer(ranks, group, *, router, capacity_factor, seed):
    """SparseMoE(process_group=group) vs SparseMoE on this rank's tokens (router grads) and on
    all ranks' tokens (expert weight grads); with router="sigmoid_bias" the routing bias keeps
    every token off the last rank's experts, so that rank receives no rows."""
    me, world = ranks.index(dist.get_rank()), len(ranks)
    kwargs = dict(router=router, capacity_factor=capacity_factor, num_shared_experts=1, dtype=torch.float64)
    torch.manual_seed(seed)
    single = SparseMoE(D, FFN, E, K, **kwargs)
    sharded = SparseMoE(D, FFN, E, K, process_group=group or dist.group.WORLD, **kwargs)
    start, local = sharded.expert_start, sharded.num_local_experts
    assert local == E // world and start == me * local
    with torch.no_grad():
        if router == "sigmoid_bias":
            single.routing_bias[E - local:] = -100.0
        state = single.state_dict()
        for name in ("w_gate_up", "w_down"):  # this rank's routed experts, then the replicated shared one
            state[name] = torch.cat([state[name][start:start + local], state[name][E:]])
        sharded.load_state_dict(state)

    def inputs(r):
        g = torch.Generator().manual_seed(seed * 100 + ranks[r])
        return torch.randn(2, 5 + r, D, generator=g, dtype=torch.float64), torch.randn(2, 5 + r, D, generator=g, dtype=torch.float64)

    x, cot = inputs(me)
    x.requires_grad_()
    out, aux = sharded(x)
    loss = (out * cot).sum() + aux.load_balancing
    grads = torch.autograd.grad(loss, [x, sharded.gate.weight, sharded.w_gate_up, sharded.w_down])

    own = others = 0
    for r in range(world):
        xr, cr = inputs(r)
        xr.requires_grad_()
        ref, ref_aux = single(xr)
        term = (ref * cr).sum() + ref_aux.load_balancing
        if r == me:
            own, ref_out, ref_x = term, ref, xr
        else:
            others = others + term
    ref_x_grad, ref_gate_grad = torch.autograd.grad(own, [ref_x, single.gate.weight], retain_graph=True)
    ref_w1, ref_w2 = torch.autograd.grad(own + others, [single.w_gate_up, single.w_down])
    _close(out, ref_out, "out")
    _close(grads[0], ref_x_grad, "grad x")
    _close(grads[1], ref_gate_grad, "grad router")
    _close(grads[2][:local], ref_w1[start:start + local], "grad w_gate_up")
    _close(grads[3][:local], ref_w2[start:start + local], "grad w_down")
    if router == "sigmoid_bias" and me == world - 1:
        assert grads[2][:local].abs().max() == 0 and grads[3][:local].abs().max() == 0


def _check_group(ranks, group):
    """Every check on the process group ``group`` (None: the default group) of global ``ranks``."""
    world = len(ranks)
    _check_mlp(ranks, group, tokens_of=lambda r: 7 + 2 * r, high=lambda w: E, activation="swiglu", capacity=None, seed=1)
    # the group's first rank sends nothing, its last rank receives nothing
    _check_mlp(ranks, group, tokens_of=lambda r: 0 if r == 0 else 6, high=lambda w: E - E // w, activation="gelu",
               capacity=None, seed=2)
    # capacity 2 per expert on each source rank: 11 tokens x 2 choices over 8 experts must drop some
    _, _, experts, _ = _rank_inputs(dist.get_rank(), 11, E, 3)
    assert route(experts, E, capacity=2).dropped.any()
    _check_mlp(ranks, group, tokens_of=lambda r: 11, high=lambda w: E, activation="swiglu", capacity=2, seed=3)
    _check_layer(ranks, group, router="softmax", capacity_factor=0.5, seed=4)
    _check_layer(ranks, group, router="sigmoid_bias", capacity_factor=None, seed=5)
    with pytest.raises(ValueError, match="divisible by the process group's world size"):
        SparseMoE(D, FFN, world + 1, 1, process_group=group or dist.group.WORLD)
    with pytest.raises(ValueError, match="experts must hold ids in"):
        expert_parallel_mlp(torch.randn(1, D), torch.randn(1, 2 * FFN, D), torch.randn(1, D, FFN),
                            torch.ones(1, 1), torch.full((1, 1), world), group)
    with pytest.raises(ValueError, match="w_gate_up_local and w_down_local must have shapes"):
        expert_parallel_mlp(torch.randn(1, D), torch.randn(1, 2 * FFN, D), torch.randn(1, D + 1, FFN),
                            torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), group)


def worker(rank, world, port):
    """Every check on the whole world, then on pairs of ranks ([0, 1], [2, 3], ...) concurrently."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_group(list(range(world)), None)
        pairs = [list(range(p, p + 2)) for p in range(0, world, 2)]
        groups = [dist.new_group(pair) for pair in pairs]  # every rank creates every group, in order
        _check_group(pairs[rank // 2], groups[rank // 2])
    finally:
        dist.destroy_process_group()
