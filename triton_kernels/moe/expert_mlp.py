"""Launchers of the expert-compute kernels (grouped_gemm.py): `grouped_mm` and its weight
gradient, and the fused expert MLP forward / backward (the backend contract of pyfast/moe/experts.py).

Fewer than `decode.DECODE_MAX_TOKENS` tokens take the fused decode kernel (decode.py).
Block sizes come from `gemm_config`, keyed by the average rows per expert (T * k / E, known from
shapes alone), the GEMM's n and k, the dtype and the GPU generation.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton

from ... import _alloc, _ext
from ...moe import activations

from ._utils import compute_dtype
from . import decode
from .grouped_gemm import (
    ACT_CODES,
    _act_bwd_gemm_kernel,
    _grouped_gemm_kernel,
    _grouped_wgrad_kernel,
    tile_schedule,
)
from .rows import combine_rows


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (max average rows per expert, config for 16-bit inputs, config for float32 inputs). Starting
# points after vLLM's fused_moe tables (small M: short, wide-K tiles; large M: 128-row tiles);
# they await tuning on a GPU.
_CONFIGS = (
    (16, GemmConfig(16, 64, 128, 4, 4), GemmConfig(16, 64, 64, 4, 3)),
    (64, GemmConfig(32, 64, 64, 4, 4), GemmConfig(32, 64, 32, 4, 3)),
    (256, GemmConfig(64, 128, 64, 4, 3), GemmConfig(64, 64, 32, 4, 3)),
    (None, GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 64, 32, 8, 3)),
)
# The interpreter runs every program in Python: the smallest tiles tl.dot accepts keep it fast.
_INTERPRETER_CONFIG = GemmConfig(16, 16, 16, 1, 1)


def gemm_config(rows_per_expert: float, n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """Block sizes of one grouped GEMM (output ``n`` columns, reduction ``k``)."""
    if _ext.triton_interpret():
        return _INTERPRETER_CONFIG
    for bound, half, single in _CONFIGS:
        if bound is None or rows_per_expert <= bound:
            config = single if dtype == torch.float32 else half
            break
    cap_n = max(16, triton.next_power_of_2(max(n, 1)))
    cap_k = max(16, triton.next_power_of_2(max(k, 1)))
    return config._replace(block_n=min(config.block_n, cap_n), block_k=min(config.block_k, cap_k))


def _precision(dtype: torch.dtype) -> str:
    """float32 GEMMs in IEEE float32 (the tolerance of DESIGN.md), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _gemm(a, a_rows_gathered, b, b_strides, counts, offsets, rows, out, *, n, k, top_k, rows_per_expert,
          assignment=None, act=0, gated=False, n_half=0, hidden=None, scatter=False, gate=None):
    """Launch `_grouped_gemm_kernel` over every tile of the ``rows`` grouped rows (``assignment``:
    the routing's assignment_of_row, needed to gather or scatter)."""
    compute_dtype(a.dtype)
    if rows == 0 or n == 0:
        return
    cfg = gemm_config(rows_per_expert, n, k, a.dtype)
    schedule = tile_schedule(counts, offsets, rows, cfg.block_m)
    grid = (schedule.expert.shape[0], triton.cdiv(n, cfg.block_n))
    _grouped_gemm_kernel[grid](
        a, a.stride(0),
        b, b.stride(0), b_strides[0], b_strides[1],
        schedule.expert, schedule.row_start, schedule.row_end,
        assignment if assignment is not None else counts, gate if gate is not None else a,
        out, out.stride(0),
        hidden if hidden is not None else out, hidden.stride(0) if hidden is not None else 0,
        n, k, n_half,
        TOP_K=top_k, GATHER=a_rows_gathered, ACT=act, GATED=gated, SCATTER=scatter, HAS_GATE=gate is not None,
        PRECISION=_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _wgrad_blocks(rows_per_expert: float, i: int, j: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M rows reduced per step, BLOCK_I, BLOCK_J, num_warps) of `_grouped_wgrad_kernel`."""
    if _ext.triton_interpret():
        return 16, 16, 16, 1
    pow2 = lambda v: max(16, triton.next_power_of_2(max(int(v), 1)))  # noqa: E731
    return min(64, pow2(rows_per_expert)), min(64, pow2(i)), min(64, pow2(j)), 4


def _wgrad(left, gather_left, right, gather_right, counts, offsets, assignment, dw, *, top_k, rows_per_expert):
    """dw[e] = left_e.T @ right_e over expert e's rows (dw (E, I, J), fully written)."""
    num_experts, i, j = dw.shape
    if dw.numel() == 0:
        return
    block_m, block_i, block_j, warps = _wgrad_blocks(rows_per_expert, i, j)
    grid = (num_experts, triton.cdiv(i, block_i) * triton.cdiv(j, block_j))
    _grouped_wgrad_kernel[grid](
        left, left.stride(0), right, right.stride(0),
        counts, offsets, assignment,
        dw, dw.stride(0), dw.stride(1), dw.stride(2),
        i, j,
        TOP_K=top_k, GATHER_L=gather_left, GATHER_R=gather_right, PRECISION=_precision(left.dtype),
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=warps,
    )


def _linear_strides(w: torch.Tensor, trans_w: bool) -> Tuple[int, int]:
    """(stride over k, stride over n) of the B operand b[k, n] = w[e].T (or w[e] when trans_w)."""
    return (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))


def grouped_mm(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    rows, k = a.shape
    n = w.shape[2] if trans_w else w.shape[1]
    out = torch.zeros((rows, n), dtype=a.dtype, device=a.device)  # padding / unused rows stay zero
    _gemm(a, False, w, _linear_strides(w, trans_w), counts, offsets, rows, out,
          n=n, k=k, top_k=1, rows_per_expert=rows / max(counts.shape[0], 1))
    return out


def grouped_mm_wgrad(grad, a, counts, offsets, num_experts: int, trans_w: bool) -> torch.Tensor:
    left, right = (a, grad) if trans_w else (grad, a)
    dw = _alloc.empty((num_experts, left.shape[1], right.shape[1]), a.dtype, a.device)
    # No gather on either side: the assignment argument is unused (counts stands in).
    _wgrad(left, False, right, False, counts, offsets, counts, dw, top_k=1,
           rows_per_expert=a.shape[0] / max(num_experts, 1))
    return dw


def _kept_slots(row_of_assignment: torch.Tensor) -> torch.Tensor:
    """(T, k): the flat slot t * k + j of every kept assignment, -1 for dropped ones; combining
    the (T * k, d) slot buffer through it sums each token's k rows."""
    slots = torch.arange(row_of_assignment.numel(), device=row_of_assignment.device).view(row_of_assignment.shape)
    return torch.where(row_of_assignment >= 0, slots, -1)


def moe_mlp_fwd(x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets, activation: str):
    (tokens, top_k), d = row_of_assignment.shape, x.shape[1]
    rows, ffn = assignment_of_row.shape[0], w2.shape[2]
    gated = activations.is_gated(activation)
    unary = activations.GATED.get(activation, activation)
    if tokens < decode.DECODE_MAX_TOKENS:
        return decode.moe_mlp_decode_fwd(
            x, w1, w2, weights, row_of_assignment, assignment_of_row, counts, offsets,
            act=ACT_CODES[unary], gated=gated, precision=_precision(x.dtype),
        )
    per_expert = tokens * top_k / w1.shape[0]
    hidden = torch.zeros((rows, w1.shape[1]), dtype=x.dtype, device=x.device)
    act = torch.empty((rows, ffn), dtype=x.dtype, device=x.device)
    # GEMM 1: gathered token rows, activation in the epilogue (hidden kept for the backward).
    _gemm(x, True, w1, _linear_strides(w1, False), counts, offsets, rows, act,
          n=ffn, k=d, top_k=top_k, rows_per_expert=per_expert, assignment=assignment_of_row,
          act=ACT_CODES[unary], gated=gated, n_half=ffn, hidden=hidden)
    # GEMM 2: gate-weighted rows scattered to their (token, slot); the combine sums the k slots.
    slots = torch.empty((tokens * top_k, d), dtype=x.dtype, device=x.device)
    _gemm(act, False, w2, _linear_strides(w2, False), counts, offsets, rows, slots,
          n=d, k=ffn, top_k=top_k, rows_per_expert=per_expert, assignment=assignment_of_row, scatter=True,
          gate=weights)
    return combine_rows(slots, _kept_slots(row_of_assignment), None), hidden


def moe_mlp_bwd(grad_out, x, w1, w2, weights, hidden, row_of_assignment, assignment_of_row, counts, offsets,
                activation: str):
    (tokens, top_k), d = row_of_assignment.shape, x.shape[1]
    rows, ffn = assignment_of_row.shape[0], w2.shape[2]
    gated = activations.is_gated(activation)
    unary = activations.GATED.get(activation, activation)
    per_expert = tokens * top_k / w1.shape[0]
    g = grad_out.to(x.dtype)
    dh = torch.empty_like(hidden)
    a_scaled = torch.empty((rows, ffn), dtype=x.dtype, device=x.device)
    cfg = gemm_config(per_expert, ffn, d, x.dtype)
    col_blocks = triton.cdiv(ffn, cfg.block_n)
    dgate_partial = torch.zeros((rows, col_blocks), dtype=torch.float32, device=x.device)
    if rows and ffn:
        schedule = tile_schedule(counts, offsets, rows, cfg.block_m)
        _act_bwd_gemm_kernel[(schedule.expert.shape[0], col_blocks)](
            g, g.stride(0),
            w2, w2.stride(0), w2.stride(1), w2.stride(2),
            schedule.expert, schedule.row_start, schedule.row_end,
            assignment_of_row, weights,
            hidden, hidden.stride(0),
            dh, dh.stride(0),
            a_scaled, a_scaled.stride(0),
            dgate_partial, dgate_partial.stride(0),
            ffn, d,
            TOP_K=top_k, ACT=ACT_CODES[unary], GATED=gated, PRECISION=_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    dw2 = _alloc.empty(w2.shape, w2.dtype, w2.device)
    _wgrad(g, True, a_scaled, False, counts, offsets, assignment_of_row, dw2, top_k=top_k, rows_per_expert=per_expert)
    dw1 = _alloc.empty(w1.shape, w1.dtype, w1.device)
    _wgrad(dh, False, x, True, counts, offsets, assignment_of_row, dw1, top_k=top_k, rows_per_expert=per_expert)
    slots = torch.empty((tokens * top_k, d), dtype=x.dtype, device=x.device)
    _gemm(dh, False, w1, _linear_strides(w1, True), counts, offsets, rows, slots,
          n=d, k=w1.shape[1], top_k=top_k, rows_per_expert=per_expert, assignment=assignment_of_row, scatter=True)
    dx = combine_rows(slots, _kept_slots(row_of_assignment), None)
    valid = assignment_of_row >= 0
    dweights = torch.zeros(tokens * top_k, dtype=torch.float32, device=x.device)
    dweights.index_put_((assignment_of_row[valid],), dgate_partial.sum(dim=1)[valid])
    return dx, dw1, dw2, dweights.view(tokens, top_k)
