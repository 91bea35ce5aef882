"""Auxiliary router losses: Switch/GShard load balancing and the ST-MoE router z-loss.

Forward kernels make one pass over (T, E): a fixed number of programs (REDUCE_PROGRAMS, not
device dependent) walk BLOCK_T-row blocks pid, pid + nprog, ... and write per-program partial
column sums; a torch.sum over the (programs, E) partials finishes the loss. No atomics, so the
result is deterministic. Backward kernels: one program per BLOCK_T-row block.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc

from ._utils import REDUCE_PROGRAMS, TILE_ELEMENTS, compute_dtype, num_warps, pow2_block, rows_block


@triton.jit
def _row_softmax(x, col_mask):
    """Softmax over the valid columns of a (rows, BLOCK_E) float32 tile."""
    xm = tl.where(col_mask[None, :], x, float("-inf"))
    m = tl.max(xm, axis=1)
    ex = tl.where(col_mask[None, :], tl.exp(xm - m[:, None]), 0.0)
    return ex / tl.sum(ex, axis=1)[:, None]


@triton.jit
def _row_logsumexp_softmax(x, col_mask):
    """(logsumexp, softmax) over the valid columns of a (rows, BLOCK_E) float32 tile."""
    xm = tl.where(col_mask[None, :], x, float("-inf"))
    m = tl.max(xm, axis=1)
    ex = tl.where(col_mask[None, :], tl.exp(xm - m[:, None]), 0.0)
    s = tl.sum(ex, axis=1)
    return m + tl.log(s), ex / s[:, None]


@triton.jit
def _load_balancing_loss_fwd_kernel(
    router_ptr,
    stride_router,
    experts_ptr,
    prob_sums_ptr,
    counts_ptr,
    T,
    E,
    K: tl.constexpr,
    WITH_PROBS: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Partial sums of this program's row blocks: sum_t p_te (when WITH_PROBS) and the number
    of (t, j) with experts[t, j] == e."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    prob_sum = tl.zeros((BLOCK_E,), dtype=tl.float32)
    count = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for blk in range(pid, tl.cdiv(T, BLOCK_T), nprog):
        rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        rows64 = rows.to(tl.int64)
        if WITH_PROBS:
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(router_ptr + rows64[:, None] * stride_router + cols[None, :], mask=mask, other=0.0)
            p = x.to(tl.float32)
            if FROM_LOGITS:
                p = tl.where(row_mask[:, None], _row_softmax(p, col_mask), 0.0)
            prob_sum += tl.sum(p, axis=0)
        for j in tl.static_range(K):
            e = tl.load(experts_ptr + rows64 * K + j, mask=row_mask, other=-1)
            count += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    if WITH_PROBS:
        tl.store(prob_sums_ptr + pid * E + cols, prob_sum, mask=col_mask)
    tl.store(counts_ptr + pid * E + cols, count, mask=col_mask)


@triton.jit
def _load_balancing_loss_bwd_kernel(
    router_ptr,
    stride_router,
    coef_ptr,
    drouter_ptr,
    T,
    E,
    FROM_LOGITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """d_te = c_e (probs input) or p_te (c_e - sum_e' c_e' p_te') (logits input)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    c = tl.load(coef_ptr + cols, mask=col_mask, other=0.0)
    if FROM_LOGITS:
        x = tl.load(router_ptr + rows64[:, None] * stride_router + cols[None, :], mask=mask, other=0.0)
        p = _row_softmax(x.to(tl.float32), col_mask)
        s = tl.sum(p * c[None, :], axis=1)
        d = p * (c[None, :] - s[:, None])
    else:
        d = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32) + c[None, :]
    tl.store(drouter_ptr + rows64[:, None] * E + cols[None, :], d.to(drouter_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _router_z_loss_fwd_kernel(
    logits_ptr,
    stride_logits,
    partial_ptr,
    T,
    E,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Partial sum over this program's row blocks of logsumexp(logits_t)^2."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(T, BLOCK_T), nprog):
        rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(
            logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        lse, _ = _row_logsumexp_softmax(x, col_mask)
        acc += tl.where(row_mask, lse * lse, 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _router_z_loss_bwd_kernel(
    logits_ptr,
    stride_logits,
    scale_ptr,
    dlogits_ptr,
    T,
    E,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dlogits_t = scale * lse_t * softmax(logits_t), scale = grad * 2 / T (a 0-d tensor)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(logits_ptr + rows64[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lse, p = _row_logsumexp_softmax(x, col_mask)
    scale = tl.load(scale_ptr).to(tl.float32)
    d = (scale * lse)[:, None] * p
    tl.store(dlogits_ptr + rows64[:, None] * E + cols[None, :], d.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _blocks(T: int, E: int) -> Tuple[int, int, int]:
    block_e = pow2_block(E)
    block_t = rows_block(T, max(2, TILE_ELEMENTS // block_e))
    return block_t, block_e, num_warps(block_t * block_e)


def _expert_stats(
    router: torch.Tensor, experts: torch.Tensor, from_logits: bool, with_probs: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_t p_te (E,) float32 or None, assignment counts (E,) int64) over T > 0 rows."""
    T, E = router.shape
    k = experts.shape[1]
    block_t, block_e, warps = _blocks(T, E)
    programs = min(triton.cdiv(T, block_t), REDUCE_PROGRAMS)
    counts = torch.empty((programs, E), dtype=torch.int32, device=router.device)
    prob_sums = torch.empty((programs, E) if with_probs else (1,), dtype=torch.float32, device=router.device)
    _load_balancing_loss_fwd_kernel[(programs,)](
        router,
        router.stride(0),
        experts,
        prob_sums,
        counts,
        T,
        E,
        K=k,
        WITH_PROBS=bool(with_probs),
        FROM_LOGITS=bool(from_logits),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=warps,
    )
    return (prob_sums.sum(dim=0) if with_probs else None), counts.sum(dim=0, dtype=torch.int64)


def load_balancing_loss_fwd(router: torch.Tensor, experts: torch.Tensor, from_logits: bool) -> torch.Tensor:
    acc = compute_dtype(router.dtype)
    T, E = router.shape
    if T == 0:
        return torch.zeros((), dtype=acc, device=router.device)
    prob_sums, counts = _expert_stats(router, experts, from_logits, with_probs=True)
    fraction = counts.to(acc) / experts.numel()
    return E * (fraction * (prob_sums / T)).sum()


def load_balancing_loss_bwd(
    grad: torch.Tensor, router: torch.Tensor, experts: torch.Tensor, from_logits: bool
) -> torch.Tensor:
    acc = compute_dtype(router.dtype)
    T, E = router.shape
    drouter = _alloc.empty((T, E), router.dtype, router.device)
    if T == 0:
        return drouter
    _, counts = _expert_stats(router, experts, from_logits, with_probs=False)
    coef = (grad.to(acc) * E) * (counts.to(acc) / experts.numel()) / T  # c_e = grad * E * f_e / T
    block_t, block_e, warps = _blocks(T, E)
    _load_balancing_loss_bwd_kernel[(triton.cdiv(T, block_t),)](
        router,
        router.stride(0),
        coef,
        drouter,
        T,
        E,
        FROM_LOGITS=bool(from_logits),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=warps,
    )
    return drouter


def router_z_loss_fwd(logits: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(logits.dtype)
    T, E = logits.shape
    if T == 0:
        return torch.zeros((), dtype=acc, device=logits.device)
    block_t, block_e, warps = _blocks(T, E)
    programs = min(triton.cdiv(T, block_t), REDUCE_PROGRAMS)
    partial = torch.empty(programs, dtype=torch.float32, device=logits.device)
    _router_z_loss_fwd_kernel[(programs,)](
        logits, logits.stride(0), partial, T, E, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps
    )
    return partial.sum() / T


def router_z_loss_bwd(grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(logits.dtype)
    T, E = logits.shape
    dlogits = _alloc.empty((T, E), logits.dtype, logits.device)
    if T == 0:
        return dlogits
    scale = (grad.to(acc) * 2 / T).reshape(())
    block_t, block_e, warps = _blocks(T, E)
    _router_z_loss_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, logits.stride(0), scale, dlogits, T, E, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps
    )
    return dlogits
