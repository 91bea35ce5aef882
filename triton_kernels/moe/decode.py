"""Decode path of the fused expert MLP (few tokens, T < `DECODE_MAX_TOKENS`): both GEMMs of every
touched expert in one kernel that reads each of that expert's weights exactly once.

Program (e, f) owns expert e and hidden units ``[f * BLOCK_F, +BLOCK_F)``: it loads all of the
expert's rows (at most T * k, usually a handful) into one row tile, computes their gate/up columns
of that slice (GEMM 1, the gathered token rows times ``w_gate_up[e]``'s rows of the slice), applies
the activation, multiplies by the matching columns of ``w_down[e]`` (GEMM 2) and adds the
gate-weighted partial outputs into a float32 ``(T, d)`` accumulator with atomics. Untouched experts
exit at once, so weight traffic is ``touched experts * 3 * d * ffn`` elements, the decode floor.
``hidden`` (the first GEMM's output) is written for the backward, as by the grouped path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _ext
from .grouped_gemm import _act

DECODE_MAX_TOKENS = 64


@triton.jit
def _moe_mlp_decode_kernel(
    x_ptr, stride_xm,
    w1_ptr, stride_w1e, stride_w1n,
    w2_ptr, stride_w2e, stride_w2n,
    gate_ptr, counts_ptr, offsets_ptr, assignment_ptr,
    out_ptr, stride_om,
    hidden_ptr, stride_hm,
    D, FFN,
    TOP_K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    count = tl.load(counts_ptr + expert)
    if count == 0:
        return
    start = tl.load(offsets_ptr + expert)
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = fs < FFN
    w1 = w1_ptr + expert * stride_w1e
    w2 = w2_ptr + expert * stride_w2e
    for m0 in range(0, count, BLOCK_M):  # one pass for T * k <= BLOCK_M rows (the decode case)
        rows = start + m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = (m0 + tl.arange(0, BLOCK_M)) < count
        assignment = tl.load(assignment_ptr + rows, mask=row_mask, other=0)
        tokens = (assignment // TOP_K).to(tl.int64)
        # GEMM 1 on this hidden slice: h[r, f] = x[token(r)] . w1[e, f]
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            a = tl.load(x_ptr + tokens[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & f_mask[None, :]
            b = tl.load(w1 + fs[None, :] * stride_w1n + ks[:, None], mask=w_mask, other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
            if GATED:
                b_up = tl.load(w1 + (fs + FFN)[None, :] * stride_w1n + ks[:, None], mask=w_mask, other=0.0)
                acc_up += tl.dot(a, b_up, input_precision=PRECISION)
        mask = row_mask[:, None] & f_mask[None, :]
        hidden = hidden_ptr + rows[:, None] * stride_hm + fs[None, :]
        tl.store(hidden, acc.to(hidden_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(hidden + FFN, acc_up.to(hidden_ptr.dtype.element_ty), mask=mask)
            act = _act(acc, ACT) * acc_up
        else:
            act = _act(acc, ACT)
        # Rounded to the input dtype like the grouped path's stored activation, then GEMM 2.
        act = tl.where(mask, act, 0.0).to(x_ptr.dtype.element_ty)
        gate = tl.load(gate_ptr + assignment, mask=row_mask, other=0.0)
        for n0 in range(0, D, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            n_mask = ns < D
            b = tl.load(w2 + ns[None, :] * stride_w2n + fs[:, None], mask=f_mask[:, None] & n_mask[None, :], other=0.0)
            part = tl.dot(act, b, input_precision=PRECISION) * gate[:, None]
            tl.atomic_add(out_ptr + tokens[:, None] * stride_om + ns[None, :], part, mask=row_mask[:, None] & n_mask[None, :])


def decode_blocks(rows: int, ffn: int, d: int):
    """(BLOCK_M, BLOCK_F, BLOCK_K, num_warps): all rows of an expert in one tile for decode sizes."""
    if _ext.triton_interpret():
        return 16, 16, 16, 1
    block_m = max(16, min(64, triton.next_power_of_2(max(rows, 1))))
    block_f = min(64, max(16, triton.next_power_of_2(ffn)))
    block_k = min(128, max(16, triton.next_power_of_2(d)))
    return block_m, block_f, block_k, 4


def moe_mlp_decode_fwd(x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets, *,
                       act: int, gated: bool, precision: str):
    """``(out (T, d), hidden (R, h))`` of the fused expert MLP, the contract of ``moe_mlp_fwd``;
    ``weights`` float32 ``(T, k)``."""
    (tokens, top_k), d = row_of_assignment.shape, x.shape[1]
    rows, ffn = assignment_of_row.shape[0], w2.shape[2]
    hidden = torch.zeros((rows, w1.shape[1]), dtype=x.dtype, device=x.device)
    out = torch.zeros((tokens, d), dtype=torch.float32, device=x.device)
    if rows and ffn and d:
        block_m, block_f, block_k, warps = decode_blocks(tokens * top_k, ffn, d)
        w1, w2 = w1.contiguous(), w2.contiguous()
        _moe_mlp_decode_kernel[(w1.shape[0], triton.cdiv(ffn, block_f))](
            x, x.stride(0),
            w1, w1.stride(0), w1.stride(1),
            w2, w2.stride(0), w2.stride(1),
            weights.reshape(-1), counts, offsets, assignment_of_row,
            out, out.stride(0),
            hidden, hidden.stride(0),
            d, ffn,
            TOP_K=top_k, ACT=act, GATED=gated, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=block_k, num_warps=warps,
        )
    return out.to(x.dtype), hidden
