"""Top-k gating: softmax / sigmoid scores, top-k selection (ties to the lowest expert index),
optional renormalization; and its gradient w.r.t. the logits.

Tiling: one program per block of BLOCK_T rows; the whole row of E <= 512 experts sits in a
(BLOCK_T, BLOCK_E = next_power_of_2(E)) register tile, so logits are read exactly once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc

from ._utils import TILE_ELEMENTS, compute_dtype, num_warps, pow2_block, rows_block


@triton.jit
def _scores(x, temp, col_mask, SOFTMAX: tl.constexpr):
    """z = x / temperature (IEEE division, so ties and order match the reference exactly) and
    p = softmax(z) over the valid columns, or sigmoid(z)."""
    z = tl.math.div_rn(x, tl.zeros_like(x) + temp)
    if SOFTMAX:
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m = tl.max(zm, axis=1)
        ex = tl.where(col_mask[None, :], tl.exp(zm - m[:, None]), 0.0)
        p = ex / tl.sum(ex, axis=1)[:, None]
    else:
        p = tl.sigmoid(z)
    return z, p


@triton.jit
def _topk_gating_fwd_kernel(
    logits_ptr,
    stride_logits,
    temp_ptr,
    bias_ptr,
    stride_bias,
    weights_ptr,
    experts_ptr,
    nonfinite_ptr,
    T,
    E,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_mask = rows < T
    col_mask = cols < E
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(logits_ptr + rows64[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    temp = tl.load(temp_ptr).to(tl.float32)
    z, p = _scores(x, temp, col_mask, SOFTMAX)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols * stride_bias, mask=col_mask, other=0.0).to(tl.float32)
        key = p + b[None, :]
    else:
        key = z

    # k rounds of (row max, lowest index among the maxima, take it out): descending key order
    # with ties to the lowest expert index, like a stable descending sort.
    avail = col_mask[None, :] & (rows[:, None] >= 0)  # (BLOCK_T, BLOCK_E): not taken yet
    w_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    e_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(K):
        kk = tl.where(avail, key, float("-inf"))
        mx = tl.max(kk, axis=1)
        idx = tl.min(tl.where(avail & (kk == mx[:, None]), cols[None, :], BLOCK_E), axis=1)
        idx = tl.minimum(idx, E - 1)  # only rows with NaN keys find no maximum
        sel = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(sel, p, 0.0), axis=1)
        avail = avail & (cols[None, :] != idx[:, None])
        w_acc = tl.where(kcols[None, :] == j, wj[:, None], w_acc)
        e_acc = tl.where(kcols[None, :] == j, idx[:, None], e_acc)
    if RENORMALIZE:
        w_acc = w_acc / tl.sum(w_acc, axis=1)[:, None]

    out_mask = row_mask[:, None] & (kcols[None, :] < K)
    out_off = rows64[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_off, w_acc.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(experts_ptr + out_off, e_acc, mask=out_mask)

    if CHECK:
        nonfinite = mask & ((x != x) | (tl.abs(x) == float("inf")))
        bad_rows = tl.max(nonfinite.to(tl.int32), axis=1)
        tl.store(nonfinite_ptr + pid, tl.sum(bad_rows, axis=0))


@triton.jit
def _topk_gating_bwd_kernel(
    grad_ptr,
    stride_grad,
    logits_ptr,
    stride_logits,
    experts_ptr,
    temp_ptr,
    dlogits_ptr,
    T,
    E,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(logits_ptr + rows64[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    temp = tl.load(temp_ptr).to(tl.float32)
    z, p = _scores(x, temp, col_mask, SOFTMAX)

    # Scatter the (T, k) slot gradients onto the expert columns: G[t, e_j] = g[t, j]; sel marks
    # the selected experts (a zero gradient does not mean "not selected").
    G = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    sel = (rows[:, None] < 0) & (cols[None, :] < 0)  # all False, (BLOCK_T, BLOCK_E)
    for j in tl.static_range(K):
        g = tl.load(grad_ptr + rows64 * stride_grad + j, mask=row_mask, other=0.0).to(tl.float32)
        e = tl.load(experts_ptr + rows64 * K + j, mask=row_mask, other=-1)
        hit = cols[None, :] == e[:, None]
        G += tl.where(hit, g[:, None], 0.0)
        sel = sel | hit

    if not SOFTMAX:
        # sigmoid'(z) = p (1 - p) = sigmoid(z) sigmoid(-z): no cancellation when p is close to 1
        dsig = p * tl.sigmoid(-z)
    if RENORMALIZE:
        ps = tl.where(sel, p, 0.0)
        s = tl.sum(ps, axis=1)
        s = tl.where(s > 0.0, s, 1.0)  # rows past T select nothing
        w = ps / s[:, None]
        gw = tl.sum(G * w, axis=1)
        if SOFTMAX:
            dz = w * (G - gw[:, None])
        else:
            dz = tl.where(sel, (G - gw[:, None]) / s[:, None] * dsig, 0.0)
    else:
        if SOFTMAX:
            gw = tl.sum(G * p, axis=1)
            dz = p * (G - gw[:, None])
        else:
            dz = G * dsig
    dx = dz / temp
    tl.store(dlogits_ptr + rows64[:, None] * E + cols[None, :], dx.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _blocks(T: int, E: int) -> Tuple[int, int, int]:
    block_e = pow2_block(E)
    block_t = rows_block(T, max(2, TILE_ELEMENTS // block_e))
    return block_t, block_e, num_warps(block_t * block_e)


def topk_gating_fwd(
    logits: torch.Tensor,
    k: int,
    softmax: bool,
    temperature: torch.Tensor,
    renormalize: bool,
    bias: Optional[torch.Tensor],
    check: bool,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    compute_dtype(logits.dtype)
    T, E = logits.shape
    weights = _alloc.empty((T, k), logits.dtype, logits.device)
    experts = _alloc.empty((T, k), torch.int32, logits.device)
    if T == 0:
        return weights, experts, 0
    block_t, block_e, warps = _blocks(T, E)
    grid = triton.cdiv(T, block_t)
    nonfinite = torch.empty(grid if check else 1, dtype=torch.int32, device=logits.device)
    _topk_gating_fwd_kernel[(grid,)](
        logits,
        logits.stride(0),
        temperature,
        bias if bias is not None else temperature,
        bias.stride(0) if bias is not None else 0,
        weights,
        experts,
        nonfinite,
        T,
        E,
        K=k,
        SOFTMAX=bool(softmax),
        RENORMALIZE=bool(renormalize),
        HAS_BIAS=bias is not None,
        CHECK=bool(check),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=pow2_block(k),
        num_warps=warps,
    )
    bad = int(nonfinite.sum().item()) if check else 0
    return weights, experts, bad


def topk_gating_bwd(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    experts: torch.Tensor,
    softmax: bool,
    temperature: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    compute_dtype(logits.dtype)
    T, E = logits.shape
    k = experts.shape[1]
    dlogits = _alloc.empty((T, E), logits.dtype, logits.device)
    if T == 0:
        return dlogits
    block_t, block_e, warps = _blocks(T, E)
    _topk_gating_bwd_kernel[(triton.cdiv(T, block_t),)](
        grad_weights,
        grad_weights.stride(0),
        logits,
        logits.stride(0),
        experts,
        temperature,
        dlogits,
        T,
        E,
        K=k,
        SOFTMAX=bool(softmax),
        RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=warps,
    )
    return dlogits
