"""FFT long convolution, forward and hand-written backward, in torch (pocketfft on the CPU).

This is the CPU backend of ``fft_conv`` (and the CUDA one beyond the fused kernel's length): torch's
FFT is the fastest correct path we have there. Against the reference it transforms at the smallest
5-smooth size >= 2L - 1 (2L for the bidirectional kernel) instead of 2L, reuses one kernel spectrum
for the whole batch, folds the D skip into that spectrum (``D v`` is the circular convolution with
``D`` at lag 0, whose spectrum is the constant D), and makes two (B, H, n) buffers per call instead
of one per elementwise step: at these sizes fresh large tensors (page faults) cost as much as the
FFTs. Its backward takes three real FFTs of (B, H) rows instead of autograd's replay of the
forward graph (two on CUDA, where the fused kernel computes the correlation).
Semantics: `reference.fft_conv`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .reference import _full_kernel, compute_dtype


def fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes pocketfft transforms fastest)."""
    best = 1 << max(n - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def transform_size(L: int, bidirectional: bool) -> int:
    return fast_size(2 * L if bidirectional else 2 * L - 1)


def _kernel_spectrum(k: Tensor, D: Optional[Tensor], n: int, bidirectional: bool, acc: torch.dtype) -> Tensor:
    """``(H, n // 2 + 1)``: the spectrum of the length-n circular kernel plus ``D`` (the skip)."""
    spectrum = torch.fft.rfft(_full_kernel(k.to(acc), n, bidirectional), n=n)
    return spectrum if D is None else spectrum.add_(D.to(acc).unsqueeze(-1))


def _padded_signal(u: Tensor, gate: Optional[Tensor], n: int, acc: torch.dtype) -> Tensor:
    """``(B, H, n)`` in ``acc``: ``v = gate * u`` in the first L positions, zeros after."""
    L = u.shape[-1]
    buf = torch.empty((*u.shape[:-1], n), dtype=acc, device=u.device)
    buf[..., L:].zero_()
    v = buf[..., :L].copy_(u)
    if gate is not None:
        v.mul_(gate)
    return buf


def _convolve(buf: Tensor, k_hat: Tensor, L: int) -> Tensor:
    """``(buf * kernel)[..., :L]`` by one real FFT pair; the result overwrites ``buf``."""
    n = buf.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(buf).mul_(k_hat), n=n, out=buf)[..., :L]


def fft_conv_fwd(
    u: Tensor, k: Tensor, D: Optional[Tensor], pregate: Optional[Tensor], postgate: Optional[Tensor], bidirectional: bool
) -> Tensor:
    acc = compute_dtype(u.dtype)
    L = u.shape[-1]
    n = transform_size(L, bidirectional)
    z = _convolve(_padded_signal(u, pregate, n, acc), _kernel_spectrum(k, D, n, bidirectional, acc), L)
    y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    return y.copy_(z) if postgate is None else torch.mul(z, postgate, out=y)  # multiplied in acc, then rounded


def fft_conv_bwd(
    grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], pregate: Optional[Tensor], postgate: Optional[Tensor],
    bidirectional: bool, fused: Optional[Callable[..., Tensor]] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. ``(u, k, D, pregate, postgate)`` (None for absent optional inputs).

    ``fused(x, gate, correlate=False)``, when given (the Triton kernel on CUDA), returns
    ``(gate x) * k + D gate x`` (``correlate``: the correlation instead) in float32 for float32 x;
    it then computes ``z`` and ``grad_v`` below, and torch's FFT only ``grad_k``.

    With ``v = pregate u``, ``z = v * k + D v``, ``y = postgate z`` and ``gz = postgate grad``:
    ``grad_v = corr(gz, k) + D gz`` (correlation: the conjugate kernel spectrum),
    ``grad_k[lag] = sum_b sum_t gz[t] v[t - lag]`` (``irfft(sum_b G conj(V))`` at the kernel's lags),
    ``grad_D = sum_{b,t} gz v``.
    """
    acc = compute_dtype(u.dtype)
    L = u.shape[-1]
    n = transform_size(L, bidirectional)
    v = u.to(acc) if pregate is None else u.to(acc) * pregate.to(acc)
    k_hat = None if fused is not None else _kernel_spectrum(k, D, n, bidirectional, acc)  # z = v * k + D v
    g = grad.to(acc)
    grad_postgate = None
    if postgate is not None:
        if fused is not None:
            z = fused(u.to(acc), pregate)
        else:
            z = _convolve(_padded_signal(v, None, n, acc), k_hat, L)
        grad_postgate = (g * z).to(postgate.dtype)
        g = g * postgate.to(acc)
    g_hat = torch.fft.rfft(g, n=n)
    v_hat = torch.fft.rfft(v, n=n)
    if fused is not None:
        grad_v = fused(g, None, correlate=True)
    else:
        grad_v = torch.fft.irfft(g_hat * k_hat.conj(), n=n)[..., :L]  # includes D g (D is real)
    grad_D = None if D is None else (g * v).sum((0, 2)).to(D.dtype)
    lags = torch.fft.irfft((g_hat * v_hat.conj()).sum(0), n=n)  # circular cross-correlation, (H, n)
    grad_k = torch.stack([lags[:, :L], lags[:, n - L:].flip(-1)]) if bidirectional else lags[:, :L]
    grad_u = grad_v if pregate is None else grad_v * pregate.to(acc)
    grad_pregate = None if pregate is None else (grad_v * u.to(acc)).to(pregate.dtype)
    return grad_u.to(u.dtype), grad_k.to(k.dtype), grad_D, grad_pregate, grad_postgate
