"""SSM layers built on the `pyfast.ssm` ops."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_tensor
from . import reference
from .ops import companion_kernel, fft_conv, s4d_kernel_real

_INITS = {"lin": reference.s4d_lin_init, "inv": reference.s4d_inv_init, "legs": reference.s4d_legs_init}
_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


class S4D(nn.Module):
    """Diagonal state-space layer: ``y = activation(u * K + D u)`` per channel, ``u (B, H, L)``.

    The kernel ``K`` comes from `s4d_kernel` (its parameters: ``log_dt (H,)``, ``A = -exp(log_A_real) +
    i A_imag (H, N)`` so Re(A) < 0 always, ``C`` as real pairs); the convolution from `fft_conv`.
    ``bidirectional=True`` learns a second kernel for the anti-causal part. Causal layers also run
    one step at a time (`step`), with outputs equal to the convolution mode.

    Args:
        d_model: H. d_state: N (complex state; the real state has 2N).
        init: ``"lin" | "inv" | "legs" | "ptd"`` (S4D-Lin/Inv/LegS, S4-PTD).
        dt_min, dt_max: log-uniform range of the initial step sizes.
    """

    def __init__(
        self, d_model: int, d_state: int = 64, *, bidirectional: bool = False, init: str = "lin",
        dt_min: float = 1e-3, dt_max: float = 1e-1, discretization: str = "zoh", activation: str = "gelu",
    ):
        super().__init__()
        check_int("S4D", "d_model", d_model, low=1)
        check_int("S4D", "d_state", d_state, low=1)
        check_choice("S4D", "init", init, (*_INITS, "ptd"))
        check_choice("S4D", "activation", activation, tuple(_ACTIVATIONS))
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4D: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        H, N = d_model, d_state
        self.bidirectional, self.discretization = bidirectional, discretization
        if init == "ptd":
            ptd = reference.s4_ptd_init(H, N)
            A, B = ptd.A, ptd.B
            self.condition_number = ptd.condition_number
        else:
            A, B = _INITS[init](H, N), torch.ones(H, N, dtype=torch.complex64)
        channels = 2 if bidirectional else 1
        C = torch.randn(channels, H, N, dtype=torch.complex64) * B  # B folded into C
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-A.real))
        self.A_imag = nn.Parameter(A.imag.clone())
        self.C = nn.Parameter(torch.view_as_real(C).clone())
        self.D = nn.Parameter(torch.randn(H))
        self.activation = _ACTIVATIONS[activation]()

    def _A(self) -> Tensor:
        """``A (H, N, 2)`` as real pairs."""
        return torch.stack([-torch.exp(self.log_A_real), self.A_imag], dim=-1)

    def kernel(self, L: int) -> Tensor:
        """``K (channels, H, L)``: channels 2 (causal, anti-causal) when bidirectional, else 1."""
        return s4d_kernel_real(torch.exp(self.log_dt), self._A(), self.C, L, discretization=self.discretization)

    def forward(self, u: Tensor) -> Tensor:
        """``u (B, H, L)`` -> ``(B, H, L)``."""
        K = self.kernel(u.shape[-1])
        y = fft_conv(u, K if self.bidirectional else K[0], self.D, bidirectional=self.bidirectional)
        return self.activation(y)

    def initial_state(self, batch: int) -> Tensor:
        """Zero recurrent state ``(batch, H, N)`` complex64."""
        return torch.zeros(batch, *self.A_imag.shape, dtype=torch.complex64, device=self.D.device)

    def step(self, u_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One position: ``u_t (B, H)`` -> ``(y_t (B, H), new state)``; causal layers only."""
        if self.bidirectional:
            raise ValueError("S4D.step: a bidirectional layer sees the future and has no recurrent mode")
        check_tensor("S4D.step", "u_t", u_t, ndim=2, dims="(B, H)")
        A = torch.view_as_complex(self._A())
        C = torch.view_as_complex(self.C[0])
        y, state = reference.s4d_step(state, u_t.float(), torch.exp(self.log_dt), A, torch.ones_like(A), C, self.D,
                                      discretization=self.discretization)
        return self.activation(y).to(u_t.dtype), state


class SpaceTime(nn.Module):
    """Companion-matrix SSM layer (SpaceTime): ``y = u * K + D u`` per channel with
    ``K[l] = c^T A^l b``, ``A = shift + last column a`` (`companion_kernel`), ``u (B, H, L)``.

    `step` runs the recurrence ``x' = A x + b u_t``, ``y_t = c^T x' + D u_t`` (equal to the
    convolution); `forecast` runs closed loop: after a context, each output becomes the layer's
    next input, for as many steps as asked.

    Args: d_model H, d_state d. ``a`` starts small (eigenvalues well inside the unit circle).
    """

    def __init__(self, d_model: int, d_state: int = 64):
        super().__init__()
        check_int("SpaceTime", "d_model", d_model, low=1)
        check_int("SpaceTime", "d_state", d_state, low=1)
        H, d = d_model, d_state
        self.a = nn.Parameter(torch.randn(H, d) * 0.5 / d)
        self.b = nn.Parameter(torch.randn(H, d) / math.sqrt(d))
        self.c = nn.Parameter(torch.randn(H, d) / math.sqrt(d))
        self.D = nn.Parameter(torch.randn(H))

    def forward(self, u: Tensor) -> Tensor:
        """``u (B, H, L)`` -> ``(B, H, L)``."""
        return fft_conv(u, companion_kernel(self.a, self.b, self.c, u.shape[-1]), self.D)

    def initial_state(self, batch: int) -> Tensor:
        """Zero state ``(batch, H, d)``."""
        return self.a.new_zeros(batch, *self.a.shape)

    def step(self, u_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One position: ``u_t (B, H)`` -> ``(y_t (B, H), new state (B, H, d))``."""
        check_tensor("SpaceTime.step", "u_t", u_t, ndim=2, dims="(B, H)")
        # A x = shift(x) + a x_last: the companion structure makes the product O(d).
        shifted = torch.nn.functional.pad(state[..., :-1], (1, 0))
        state = shifted + self.a * state[..., -1:] + self.b * u_t.unsqueeze(-1).to(state.dtype)
        y = (self.c * state).sum(-1) + self.D * u_t
        return y.to(u_t.dtype), state

    def forecast(self, context: Tensor, horizon: int) -> Tensor:
        """Closed-loop forecast: run ``context (B, H, L)`` through the recurrence, then feed each
        output back as the next input for ``horizon`` steps. Returns ``(B, H, horizon)``."""
        check_tensor("SpaceTime.forecast", "context", context, ndim=3, dims="(B, H, L)")
        check_int("SpaceTime.forecast", "horizon", horizon, low=0)
        if context.shape[-1] < 1:
            raise ValueError(f"SpaceTime.forecast: context must hold at least one position, got {tuple(context.shape)}")
        state = self.initial_state(context.shape[0])
        for t in range(context.shape[-1]):
            y, state = self.step(context[..., t], state)
        outputs = []
        for _ in range(horizon):
            outputs.append(y)
            y, state = self.step(y, state)
        return torch.stack(outputs, -1) if outputs else context.new_zeros(*context.shape[:2], 0)
