"""Fused per-example gradient contraction in the EK-FAC eigenbasis, squared and reduced on chip.

Inputs are the rotated activations ``a~ = a Q_A (b, T, d_in)`` and gradients ``s~ = s Q_S
(b, T, d_out)``. One program owns a ``(BLOCK_O, BLOCK_I)`` tile of ``G~_n = s~_n^T a~_n`` and walks
the examples n, contracting over tokens with tl.dot; the tile never leaves registers:
  Lambda mode: ``sum_n G~_n^2`` accumulated per tile (the caller divides by b);
  self mode:   ``sum_ij G~_n,ij^2 * inv_ij`` per example and tile, written as partials
               ``(b, tiles)`` that a torch sum over tiles finishes (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _alloc
from ._utils import dot_block, dot_precision


@triton.jit
def _rotated_gradient_squares_kernel(
    a_ptr,
    s_ptr,
    inv_ptr,
    out_ptr,
    B,
    T,
    D_IN,
    D_OUT,
    stride_ab,
    stride_at,
    stride_sb,
    stride_st,
    SELF: tl.constexpr,
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
    if SELF:
        inv = tl.load(inv_ptr + co[:, None] * D_IN + ci[None, :], mask=out_ok, other=0.0)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    a_n = a_ptr  # advanced by one example per iteration (64-bit pointer arithmetic)
    s_n = s_ptr
    for n in range(B):
        g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            # s~ tile loaded transposed, (BLOCK_O, BLOCK_T): G~ = s~^T a~ contracts over tokens.
            s_t = tl.load(
                s_n + t[None, :] * stride_st + co[:, None],
                mask=t_ok[None, :] & (co[:, None] < D_OUT),
                other=0.0,
            )
            a_t = tl.load(
                a_n + t[:, None] * stride_at + ci[None, :],
                mask=t_ok[:, None] & (ci[None, :] < D_IN),
                other=0.0,
            )
            g += tl.dot(s_t, a_t, input_precision=PRECISION)
        if SELF:
            tl.store(out_ptr + n * tiles + tile, tl.sum(tl.sum(g * g * inv, axis=1), axis=0))
        else:
            total += g * g
        a_n += stride_ab
        s_n += stride_sb
    if not SELF:
        tl.store(out_ptr + co[:, None] * D_IN + ci[None, :], total, mask=out_ok)


def rotated_gradient_squares(
    a_rot: torch.Tensor, s_rot: torch.Tensor, inverse: Optional[torch.Tensor], exact: bool
) -> torch.Tensor:
    """``a_rot (b, T, d_in)``, ``s_rot (b, T, d_out)`` float32 with unit last stride.

    ``inverse`` None: ``sum_n G~_n^2`` as ``(d_out, d_in) float32``. ``inverse (d_out, d_in)
    float32``: ``(b,) float32`` self scores ``sum_ij G~_n,ij^2 inverse_ij``. ``exact``: float32
    products (the data came from float32 inputs) instead of tf32.
    """
    B, T, d_in = a_rot.shape
    d_out = s_rot.shape[-1]
    block_o, block_i = dot_block(d_out), dot_block(d_in)
    grid = (triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    self_mode = inverse is not None
    out = _alloc.empty((B, grid[0] * grid[1]) if self_mode else (d_out, d_in), torch.float32, a_rot.device)
    if d_out == 0 or d_in == 0 or (self_mode and B == 0):
        return out.sum(dim=1) if self_mode else out
    _rotated_gradient_squares_kernel[grid](
        a_rot,
        s_rot,
        inverse if self_mode else a_rot,
        out,
        B,
        T,
        d_in,
        d_out,
        a_rot.stride(0),
        a_rot.stride(1),
        s_rot.stride(0),
        s_rot.stride(1),
        SELF=self_mode,
        PRECISION=dot_precision(exact),
        BLOCK_T=dot_block(T, hi=32),
        BLOCK_O=block_o,
        BLOCK_I=block_i,
        num_warps=4,
    )
    return out.sum(dim=1) if self_mode else out
