"""S4D Vandermonde kernel and its adjoint sums, evaluating exp(l w) per (n, l) tile.

The phase ``l Im(w)`` reaches ~1e4 rad at L = 16K, beyond float32 accuracy, so it is formed in
float64 and reduced modulo 2 pi before the float32 cos / sin; everything else is float32.
Forward: one program per (row = (c, h), BLOCK_L positions), a loop over N in BLOCK_N tiles.
Backward: one program per (row, BLOCK_N states), a loop over L in BLOCK_L tiles.
K and the incoming gradient may be float16/bfloat16; the arithmetic stays float32.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc


@triton.jit
def _powers(wr, wi, pos):
    """(re, im) of exp(l w) on a (BLOCK_N, BLOCK_L) tile: w (BLOCK_N,) float32, pos (BLOCK_L,) int."""
    l64 = pos.to(tl.float64)[None, :]
    phase = l64 * wi.to(tl.float64)[:, None]
    phase = (phase - 6.283185307179586 * tl.floor(phase / 6.283185307179586)).to(tl.float32)
    mag = tl.exp((l64 * wr.to(tl.float64)[:, None]).to(tl.float32))
    return mag * tl.cos(phase), mag * tl.sin(phase)


@triton.jit
def _vandermonde_fwd_kernel(W_ptr, w_ptr, K_ptr, H, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0)  # c * H + h
    h = row % H
    pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = n < N
        Wr = tl.load(W_ptr + 2 * (row * N + n), mask=mask, other=0.0)
        Wi = tl.load(W_ptr + 2 * (row * N + n) + 1, mask=mask, other=0.0)
        wr = tl.load(w_ptr + 2 * (h * N + n), mask=mask, other=0.0)
        wi = tl.load(w_ptr + 2 * (h * N + n) + 1, mask=mask, other=0.0)
        pr, pi = _powers(wr, wi, pos)
        acc += tl.sum(Wr[:, None] * pr - Wi[:, None] * pi, axis=0)
    tl.store(K_ptr + row * L + pos, (2 * acc).to(K_ptr.dtype.element_ty), mask=pos < L)


@triton.jit
def _vandermonde_bwd_kernel(g_ptr, w_ptr, S0_ptr, S1_ptr, H, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0)
    h = row % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    wr = tl.load(w_ptr + 2 * (h * N + n), mask=mask, other=0.0)
    wi = tl.load(w_ptr + 2 * (h * N + n) + 1, mask=mask, other=0.0)
    s0r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s0i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        g = tl.load(g_ptr + row * L + pos, mask=pos < L, other=0.0).to(tl.float32)
        lg = pos.to(tl.float32) * g
        pr, pi = _powers(wr, wi, pos)
        s0r += tl.sum(g[None, :] * pr, axis=1)
        s0i += tl.sum(g[None, :] * pi, axis=1)
        s1r += tl.sum(lg[None, :] * pr, axis=1)
        s1i += tl.sum(lg[None, :] * pi, axis=1)
    out = 2 * (row * N + n)
    tl.store(S0_ptr + out, s0r, mask=mask)
    tl.store(S0_ptr + out + 1, s0i, mask=mask)
    tl.store(S1_ptr + out, s1r, mask=mask)
    tl.store(S1_ptr + out + 1, s1i, mask=mask)


def _blocks(N: int) -> Tuple[int, int]:
    block_n = min(64, triton.next_power_of_2(max(N, 1)))
    return block_n, 128


def vandermonde_fwd(W: torch.Tensor, w: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """``K (channels, H, L)`` in ``dtype`` (float32/float16/bfloat16) from ``W (channels, H, N, 2)``,
    ``w (H, N, 2)`` float32."""
    channels, H, N, _ = W.shape
    K = _alloc.empty((channels, H, L), dtype, W.device)
    block_n, block_l = _blocks(N)
    if K.numel():
        grid = (channels * H, triton.cdiv(L, block_l))
        _vandermonde_fwd_kernel[grid](W, w, K, H, N, L, BLOCK_N=block_n, BLOCK_L=block_l)
    return K


def vandermonde_bwd(grad: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(S0, S1)`` ``(channels, H, N, 2)`` float32: ``sum_l g exp(l w)`` and ``sum_l l g exp(l w)``."""
    channels, H, L = grad.shape
    N = w.shape[1]
    S0 = _alloc.empty((channels, H, N, 2), w.dtype, grad.device)
    S1 = _alloc.empty((channels, H, N, 2), w.dtype, grad.device)
    block_n, block_l = _blocks(N)
    if S0.numel():
        grid = (channels * H, triton.cdiv(N, block_n))
        _vandermonde_bwd_kernel[grid](grad, w, S0, S1, H, N, L, BLOCK_N=block_n, BLOCK_L=block_l)
    return S0, S1
