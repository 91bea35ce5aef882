"""Fused per-example gradient contractions: ``G_n = s_n^T a_n`` (b examples of T tokens) is built
tile by tile in registers and reduced at once, never written to memory.

One program owns a ``(BLOCK_O, BLOCK_I)`` tile of the ``(d_out, d_in)`` gradient and walks the
examples n, contracting over tokens with tl.dot. Per example, the tile is then
  MODE 0 (Lambda):   squared and accumulated, ``sum_n G_n^2`` (inputs rotated into the eigenbasis;
                     the caller divides by b);
  MODE 1 (self):     reduced to ``sum_ij G_n,ij^2 w_ij`` (rotated inputs, w = 1 / (Lambda + damping));
  MODE 2 (pairwise): reduced to ``<P_q, G_n>`` for every query q.
Modes 1 and 2 write per-tile partials that a torch sum over tiles finishes (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _alloc
from ._utils import dot_block, dot_precision

LAMBDA, SELF, PAIRWISE = 0, 1, 2


@triton.jit
def _example_gradients_kernel(
    a_ptr,
    s_ptr,
    w_ptr,
    out_ptr,
    B,
    T,
    D_IN,
    D_OUT,
    Q,
    stride_ab,
    stride_at,
    stride_sb,
    stride_st,
    MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    tiles = tl.num_programs(0) * tl.num_programs(1)
    tile = pid_o * tl.num_programs(1) + pid_i
    co = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ci = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    out_ok = (co[:, None] < D_OUT) & (ci[None, :] < D_IN)
    w_offsets = co[:, None] * D_IN + ci[None, :]
    if MODE == 1:
        w = tl.load(w_ptr + w_offsets, mask=out_ok, other=0.0)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    a_n = a_ptr  # advanced by one example per iteration (64-bit pointer arithmetic)
    s_n = s_ptr
    for n in range(B):
        g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            # s tile loaded transposed, (BLOCK_O, BLOCK_T): G = s^T a contracts over tokens.
            s_t = tl.load(s_n + t[None, :] * stride_st + co[:, None], mask=t_ok[None, :] & (co[:, None] < D_OUT), other=0.0)
            a_t = tl.load(a_n + t[:, None] * stride_at + ci[None, :], mask=t_ok[:, None] & (ci[None, :] < D_IN), other=0.0)
            g += tl.dot(s_t, a_t, input_precision=PRECISION)
        if MODE == 0:
            total += g * g
        elif MODE == 1:
            tl.store(out_ptr + n * tiles + tile, tl.sum(tl.sum(g * g * w, axis=1), axis=0))
        else:
            p_q = w_ptr
            out_q = out_ptr + n * tiles + tile
            for _ in range(Q):
                p = tl.load(p_q + w_offsets, mask=out_ok, other=0.0)
                tl.store(out_q, tl.sum(tl.sum(g * p, axis=1), axis=0))
                p_q += D_OUT * D_IN
                out_q += B * tiles
        a_n += stride_ab
        s_n += stride_sb
    if MODE == 0:
        tl.store(out_ptr + w_offsets, total, mask=out_ok)


def _launch(mode: int, a: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor], exact: bool) -> torch.Tensor:
    B, T, d_in = a.shape
    d_out = s.shape[-1]
    Q = w.shape[0] if mode == PAIRWISE else 1
    block_o, block_i = dot_block(d_out), dot_block(d_in)
    grid = (triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    tiles = grid[0] * grid[1]
    shape = {LAMBDA: (d_out, d_in), SELF: (B, tiles), PAIRWISE: (Q, B, tiles)}[mode]
    out = _alloc.empty(shape, torch.float32, a.device)
    if tiles and (mode == LAMBDA or B * Q):  # otherwise out is empty, or sums over an empty axis
        _example_gradients_kernel[grid](
            a, s, w if w is not None else a, out,
            B, T, d_in, d_out, Q,
            a.stride(0), a.stride(1), s.stride(0), s.stride(1),
            MODE=mode, PRECISION=dot_precision(exact), BLOCK_T=dot_block(T, hi=32),
            BLOCK_O=block_o, BLOCK_I=block_i, num_warps=4,
        )  # fmt: skip
    return out if mode == LAMBDA else out.sum(dim=-1)


def gradient_squares(a_rot: torch.Tensor, s_rot: torch.Tensor, exact: bool) -> torch.Tensor:
    """``sum_n (s~_n^T a~_n)^2`` as ``(d_out, d_in) float32``. ``a_rot (b, T, d_in)``,
    ``s_rot (b, T, d_out)`` float32 with unit last stride; ``exact``: float32 products instead of tf32."""
    return _launch(LAMBDA, a_rot, s_rot, None, exact)


def weighted_gradient_squares(a_rot: torch.Tensor, s_rot: torch.Tensor, weights: torch.Tensor, exact: bool) -> torch.Tensor:
    """``(b,) float32``: ``sum_ij (s~_n^T a~_n)_ij^2 weights_ij``; ``weights (d_out, d_in) float32`` contiguous."""
    return _launch(SELF, a_rot, s_rot, weights, exact)


def gradient_inner_products(a: torch.Tensor, s: torch.Tensor, queries: torch.Tensor, exact: bool) -> torch.Tensor:
    """``(q, b) float32``: ``<P_q, s_n^T a_n>``; ``queries (q, d_out, d_in) float32`` contiguous,
    ``a``, ``s`` float32 with unit last stride (masked tokens zeroed by the caller)."""
    return _launch(PAIRWISE, a, s, queries, exact)
