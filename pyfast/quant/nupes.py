"""NUPES calibration: learn the exponent and the weights to quantize by gradient descent.

Starting from the PowerQuant search (exponent per layer, clip per group), the weights ``V`` to be
quantized (initialized to W, free to move anywhere in the quantized space, not only to round up or
down) and ``log a`` are optimized with Adam through the fake quantization ``Q(V; a)`` with a
straight-through round, minimizing the output error ``||x W^T - x Q(V)^T||^2 / ||x W^T||^2`` on
calibration inputs, or the weight error without them (data-free). Scales stay those of the search.

Numerical care near zero (the power function's derivative in ``a``, ``|y|^a log|y|``, and in y,
``a |y|^(a-1)``, blow up at 0): powers are taken as ``exp(a log max(|y|, eps))`` and multiplied by
``sign(y)``, which is 0 at 0, so values and gradients stay finite.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .ops import _check_bits, _check_weight, power_quantize, search_exponent
from .reference import QuantizedTensor, compute_dtype

_EPS = 1e-12


class NupesResult(NamedTuple):
    """``q``: the calibrated `QuantizedTensor`; ``exponent``; ``initial_loss`` (the search's) and
    ``loss`` (the returned iterate's, the best seen)."""

    q: QuantizedTensor
    exponent: float
    initial_loss: float
    loss: float


def _signed_power(y: Tensor, a: Tensor) -> Tensor:
    """``sign(y) |y|^a`` with finite gradients at y = 0 (module docstring)."""
    return torch.sign(y) * torch.exp(a * torch.log(y.abs().clamp_min(_EPS)))


def fake_quantize(v: Tensor, scale: Tensor, bits: int, exponent: Tensor, symmetric: bool = True) -> Tensor:
    """``Q(v)`` on the power grid, differentiable in ``v`` (straight-through round) and ``exponent``.

    v ``(N, G, g)``, scale ``(N, G, 1)``; the forward value equals `reference.dequantize` of
    `reference.power_quantize` with these scales (up to float rounding near ties)."""
    L = 2**bits
    t0, step = (-1.0, 2.0 / (L - 1)) if symmetric else (-1.0, 2.0 / L)
    t_max = 1.0 if symmetric else 1.0 - 2.0 / L
    u = _signed_power(v / scale, exponent).clamp(-1.0, t_max)
    pos = (u - t0) / step
    pos = pos + (torch.round(pos) - pos).detach()  # straight-through round (ties to even)
    t = t0 + pos * step
    return scale * _signed_power(t, 1.0 / exponent)


def nupes_calibrate(
    w: Tensor,
    bits: int,
    x: Optional[Tensor] = None,
    *,
    group_size: Optional[int] = 128,
    steps: int = 200,
    lr: float = 1e-3,
    exponent_lr: float = 5e-2,
    batch_rows: int = 1024,
    seed: int = 0,
    symmetric: bool = True,
    progress: bool = True,
) -> NupesResult:
    """Calibrate the quantization of a ``(N, K)`` Linear weight (NUPES).

    Args:
        w: ``(N, K)`` float weight. x: optional calibration inputs ``(..., K)`` (data-driven);
            None optimizes the weight error (data-free).
        steps: Adam steps; lr / exponent_lr: step sizes of V (relative to each group's scale) and
            of ``log a``. batch_rows: rows of x per step (sampled with ``seed``).
        progress: a progress bar over the steps.

    Returns:
        `NupesResult`; deterministic for a given ``seed``.
    """
    fn = "nupes_calibrate"
    _check_bits(fn, bits)
    _check_weight(fn, w, 1, group_size, ndim=2)
    if x is not None and (not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != w.shape[1]):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a tensor with last dimension in_features = {w.shape[1]}, got {shape}")
    acc = compute_dtype(w.dtype)
    N, K = w.shape
    g = K if group_size is None else group_size
    found = search_exponent(w, bits, group_size=group_size, x=x, symmetric=symmetric)
    target = w.detach().to(acc).reshape(N, K // g, g)
    scale = (target.abs().amax(-1) * found.clip.to(acc))[..., None]
    xs = None if x is None else x.detach().reshape(-1, K).to(acc)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    v = target.clone().requires_grad_()
    log_a = torch.tensor(math.log(found.exponent), dtype=acc, device=w.device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [v], "lr": lr}, {"params": [log_a], "lr": exponent_lr}])
    # V's step is relative to its group's scale: optimize V / scale.
    with torch.no_grad():
        v.div_(scale)

    def loss_of(rows: Optional[Tensor]) -> Tensor:
        q = fake_quantize(v * scale, scale, bits, log_a.exp(), symmetric)
        d = (q - target).reshape(N, K)
        if xs is None:
            return d.square().sum() / target.square().sum()
        xb = xs if rows is None else xs[rows]
        return (xb @ d.T).square().sum() / (xb @ target.reshape(N, K).T).square().sum().clamp_min(1e-30)

    with torch.no_grad():
        initial = loss_of(None).item()
    best = (initial, v.detach().clone(), log_a.detach().clone())
    from rich.progress import track

    for _ in track(range(steps), description=f"NUPES W{bits}", disable=not progress):
        rows = None
        if xs is not None and xs.shape[0] > batch_rows:
            rows = torch.randint(0, xs.shape[0], (batch_rows,), generator=gen).to(w.device)
        opt.zero_grad()
        loss_of(rows).backward()
        opt.step()
        with torch.no_grad():
            current = loss_of(None).item()
        if current < best[0]:
            best = (current, v.detach().clone(), log_a.detach().clone())

    loss, v_best, log_a_best = best
    exponent = float(log_a_best.exp())
    v_final = (v_best * scale).reshape(N, K)
    absmax = v_final.reshape(N, K // g, g).abs().amax(-1)
    clip = scale[..., 0] / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # keep the scales
    q = power_quantize(v_final, bits, exponent, group_size=group_size, clip=clip.clamp_min(1e-6), symmetric=symmetric)
    return NupesResult(q, exponent, initial, loss)
