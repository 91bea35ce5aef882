"""Fused 1-D mixture kernel matrix with input derivatives (see pyfast/gp/kernels.py for the math).

Program (i, j) computes the ``(BLOCK_M, BLOCK_N)`` tile of ``K``, ``dK/dx`` and ``d2K/dx dx'``,
looping over the ``Q`` components with the tile in registers (float32), so nothing of size
``Q x n1 x n2`` exists. Component parameters are read as scalars per iteration.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ... import _alloc

# Component codes shared with the launcher.
_CODES = {"rbf": 0, "sm_gauss": 1, "matern12": 2, "matern32": 3, "matern52": 4}


@triton.jit
def _mixture_kernel_fwd_kernel(
    x1_ptr, x2_ptr, logw_ptr, ls_ptr, mu_ptr,
    k_ptr, dk_ptr, d2k_ptr,
    N1, N2, Q,
    COMPONENT: tl.constexpr, HAS_MU: tl.constexpr, DERIV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < N1, cols < N2
    a = tl.load(x1_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    b = tl.load(x2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    d = a[:, None] - b[None, :]
    ad = tl.abs(d)
    k = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d2k = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q in range(Q):
        w = tl.exp(tl.load(logw_ptr + q).to(tl.float32))
        l = tl.load(ls_ptr + q).to(tl.float32)
        inv_l2 = 1.0 / (l * l)
        if COMPONENT == 0 or COMPONENT == 1:
            c0 = 0.5 if COMPONENT == 0 else 1.0
            inv = c0 * inv_l2
            g = tl.exp(-inv * d * d)
            g1 = -2.0 * inv * d * g
            g2 = (4.0 * inv * inv * d * d - 2.0 * inv) * g
        elif COMPONENT == 2:
            g = tl.exp(-ad / l)
            g1 = g * 0.0
            g2 = g * 0.0
        elif COMPONENT == 3:
            r = 1.7320508075688772 * ad / l
            e = tl.exp(-r)
            g = (1.0 + r) * e
            g1 = -3.0 * d * inv_l2 * e
            g2 = -3.0 * inv_l2 * (1.0 - r) * e
        else:
            r = 2.23606797749979 * ad / l  # sqrt5 r
            e = tl.exp(-r)
            g = (1.0 + r + r * r / 3.0) * e
            g1 = -5.0 / 3.0 * d * inv_l2 * (1.0 + r) * e
            g2 = -5.0 / 3.0 * inv_l2 * (1.0 + r - r * r) * e
        if HAS_MU:
            f = 6.283185307179586 * tl.load(mu_ptr + q).to(tl.float32)
            c = tl.cos(f * d)
            s = tl.sin(f * d)
            k += w * g * c
            if DERIV:
                dk += w * (g1 * c - f * g * s)
                d2k -= w * (g2 * c - 2.0 * f * g1 * s - f * f * g * c)
        else:
            k += w * g
            if DERIV:
                dk += w * g1
                d2k -= w * g2
    offs = rows[:, None].to(tl.int64) * N2 + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(k_ptr + offs, k.to(k_ptr.dtype.element_ty), mask=mask)
    if DERIV:
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(d2k_ptr + offs, d2k.to(d2k_ptr.dtype.element_ty), mask=mask)


def mixture_kernel_fwd(
    x1: torch.Tensor, x2: torch.Tensor, log_weights: torch.Tensor, lengthscales: torch.Tensor,
    means: Optional[torch.Tensor], component: str, derivatives: bool,
) -> List[torch.Tensor]:
    """``[K]`` or ``[K, dK/dx, d2K/dx dx']``, each ``(n1, n2)`` in ``x1.dtype``."""
    n1, n2 = x1.shape[0], x2.shape[0]
    outs = [_alloc.empty((n1, n2), x1.dtype, x1.device) for _ in range(3 if derivatives else 1)]
    if n1 == 0 or n2 == 0:
        return outs
    x1, x2 = x1.contiguous(), x2.contiguous()
    lw, ls = log_weights.contiguous(), lengthscales.contiguous()
    mu = lw if means is None else means.contiguous()
    dk, d2k = (outs[1], outs[2]) if derivatives else (outs[0], outs[0])
    bm, bn = 32, 32
    grid = (triton.cdiv(n1, bm), triton.cdiv(n2, bn))
    _mixture_kernel_fwd_kernel[grid](
        x1, x2, lw, ls, mu, outs[0], dk, d2k, n1, n2, ls.shape[0],
        COMPONENT=_CODES[component], HAS_MU=means is not None, DERIV=derivatives,
        BLOCK_M=bm, BLOCK_N=bn,
    )
    return outs
