"""The S4D layer: convolution mode against the reference, step mode equal to convolution mode,
torch.compile without complex values in the graph, and training on a long-range task."""
import math

import pytest
import torch
from torch import nn

from kernel_cases import assert_close
from pyfast.ssm import reference
from pyfast.ssm.nn import S4D, SpaceTime
from ssm_inputs import signal


def _layer_reference(layer: S4D, u: torch.Tensor) -> torch.Tensor:
    """The layer's forward from reference.py pieces, in float64."""
    A = torch.view_as_complex(layer._A().detach().double())
    C = torch.view_as_complex(layer.C.detach().double())
    dt = torch.exp(layer.log_dt.detach().double())
    K = reference.s4d_kernel(dt, A, C, u.shape[-1], discretization=layer.discretization)
    y = reference.fft_conv_direct(u.double(), K if layer.bidirectional else K[0], layer.D.detach().double(),
                                  bidirectional=layer.bidirectional)
    return layer.activation(y)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("init", ["lin", "inv", "legs", "ptd"])
def test_forward_matches_reference(bidirectional, init):
    layer = S4D(6, 8, bidirectional=bidirectional, init=init, discretization="bilinear" if init == "inv" else "zoh")
    u = signal(2, 6, 97)
    assert_close(layer(u), _layer_reference(layer, u), torch.float32, f"{init} bidirectional={bidirectional}")


def run_steps(layer, u):
    """The layer's recurrent mode over ``u (B, H, L)``, one step per position: ``(B, H, L)``."""
    with torch.no_grad():
        state = layer.initial_state(u.shape[0])
        steps = []
        for t in range(u.shape[-1]):
            y_t, state = layer.step(u[..., t], state)
            steps.append(y_t)
    return torch.stack(steps, -1)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_step_equals_convolution(discretization):
    layer = S4D(5, 7, discretization=discretization, dt_min=1e-2, dt_max=1e-1)
    u = signal(3, 5, 40)
    with torch.no_grad():
        y_conv = layer(u)
    assert_close(run_steps(layer, u), y_conv.double(), torch.float32)


def test_step_rejects_bidirectional():
    layer = S4D(2, 3, bidirectional=True)
    with pytest.raises(ValueError, match="S4D.step: a bidirectional layer"):
        layer.step(torch.randn(1, 2), layer.initial_state(1))


def test_compile_has_no_complex_in_graph():
    """fullgraph capture of forward and backward; every value in the captured graph is real."""
    layer = S4D(4, 6, bidirectional=True)
    u = signal(2, 4, 33).requires_grad_()
    seen = []

    def inspect(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                seen.append(value.dtype)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=inspect)
    y = compiled(u)
    y.square().sum().backward()
    assert seen and not any(d.is_complex for d in seen), sorted(set(map(str, seen)))
    y_eager = layer(u)
    torch.testing.assert_close(y, y_eager)
    grad_eager = torch.autograd.grad(y_eager.square().sum(), u)[0]
    torch.testing.assert_close(u.grad, grad_eager)


def test_bad_arguments():
    with pytest.raises(ValueError, match="S4D: init must be one of"):
        S4D(4, 4, init="random")
    with pytest.raises(ValueError, match="S4D: need 0 < dt_min <= dt_max"):
        S4D(4, 4, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match=r"fft_conv: k must have shape \(H, L\) = \(3, 16\) to match u"):
        S4D(4, 4)(torch.randn(1, 3, 16))


def test_trains_on_delayed_copy():
    """One S4D layer learns to output the token seen 256 positions earlier in sequences of 1024."""
    V, H, N, L, delay, batch, steps = 8, 64, 32, 1024, 256, 4, 80
    embed, layer, head = nn.Embedding(V, H), S4D(H, N, dt_min=2e-3, dt_max=2e-2), nn.Linear(H, V)
    model = nn.ModuleList([embed, layer, head])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)

    def loss_on(x):
        logits = head(layer(embed(x).transpose(1, 2)).transpose(1, 2))[:, delay:]
        return nn.functional.cross_entropy(logits.reshape(-1, V), x[:, : L - delay].reshape(-1))

    for _ in range(steps):
        loss = loss_on(torch.randint(0, V, (batch, L)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_on(torch.randint(0, V, (16, L))).item()
    baseline = math.log(V)  # uniform guess: the delayed token is independent of everything before it
    assert final < 0.75 * baseline, f"loss {final:.3f} vs trivial baseline {baseline:.3f}"


def test_spacetime_step_equals_convolution():
    layer = SpaceTime(4, 6).double()
    u = signal(2, 4, 30, dtype=torch.float64)
    with torch.no_grad():
        y_conv = layer(u)
    torch.testing.assert_close(run_steps(layer, u), y_conv)


def test_spacetime_closed_loop_forecast():
    """The forecast continues the sequence with the layer's own outputs: convolving the context
    followed by the forecast (shifted by one: each output is the next input) reproduces it."""
    layer = SpaceTime(3, 5).double()
    context = signal(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        future = layer.forecast(context, 10)
        assert future.shape == (2, 3, 10)
        full = torch.cat([context, future], -1)                 # inputs u_0 .. u_25
        y = layer(full)                                         # outputs y_0 .. y_25
    # The first forecast is the output at the last context position; each later one the output
    # one position after the input it followed.
    torch.testing.assert_close(future, y[..., 15:25])
    assert layer.forecast(context, 0).shape == (2, 3, 0)


def test_spacetime_trains():
    """Gradients reach a, b, c, D through companion_kernel + fft_conv."""
    layer = SpaceTime(3, 4)
    layer(signal(2, 3, 20)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in layer.parameters())
