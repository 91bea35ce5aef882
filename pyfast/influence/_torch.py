"""The influence ops in fast plain torch: the CPU path (no C++ kernel beat it) and the GPU path
where no Triton kernel exists.

Per-example gradients exist only as chunks of ``chunk x d_out x d_in`` (at most
`CHUNK_BYTES`): each chunk is one batched GEMM over tokens, consumed at once (squared and summed
for Lambda, reduced against ``1 / (Lambda + damping)`` for self scores, one GEMM against the
queries for pairwise scores). Per-token scores, and queries whose rank makes it cheaper, never
form a gradient at all: ``<P, s_t a_t^T> = s_t^T P a_t``, and with ``P = L R`` that is
``(L^T s_t) . (R a_t)``.
Inputs are cast to the accumulation dtype (float32, or float64 for float64 inputs) chunk by chunk.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .factors import LowRankQuery
from .reference import compute_dtype

CHUNK_BYTES = 64 << 20


@contextlib.contextmanager
def chunk_bytes(nbytes: Optional[int]):
    """Bound the per-example gradient chunks to ``nbytes`` within the block (None: keep `CHUNK_BYTES`)."""
    global CHUNK_BYTES
    saved = CHUNK_BYTES
    CHUNK_BYTES = saved if nbytes is None else nbytes
    try:
        yield
    finally:
        CHUNK_BYTES = saved


def _chunks(b: int, per_example_bytes: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(per_example_bytes, 1))
    for start in range(0, b, step):
        yield slice(start, min(b, start + step))


def _masked(x: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x if mask is None else x * mask.to(dtype).unsqueeze(-1)


def covariance(x: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(``sum_t x_t x_t^T`` over unmasked rows, their count), both in the accumulation dtype."""
    acc = compute_dtype(x.dtype)
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if mask is None:
        rows = rows.to(acc)
        return rows.T @ rows, torch.tensor(rows.shape[0], dtype=acc, device=x.device)
    weights = mask.reshape(-1).to(acc)
    return rows.to(acc).T @ (rows.to(acc) * weights[:, None]), weights.sum()


def _rotated_gradients(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, mask: Optional[Tensor]) -> Iterator[Tuple[slice, Tensor]]:
    """Chunks of ``G~_n = Q_S^T G_n Q_A``: ``(chunk, d_out, d_in)``.

    Each basis is applied where it is cheaper: to the T tokens before the contraction
    (``(s Q_S)^T (a Q_A)``, T d^2 flops per example) or to the gradient after it (d_out d_in d)."""
    acc = compute_dtype(a.dtype)
    Q_A, Q_S = Q_A.to(acc), Q_S.to(acc)
    b, T, d_in = a.shape
    d_out = s.shape[-1]
    rotate_a_tokens, rotate_s_tokens = T <= d_out, T <= d_in
    for rows in _chunks(b, d_out * d_in * torch.finfo(acc).bits // 8):
        a_rows = _masked(a[rows], None if mask is None else mask[rows], acc)
        s_rows = s[rows].to(acc)
        if rotate_a_tokens:
            a_rows = a_rows @ Q_A
        if rotate_s_tokens:
            s_rows = s_rows @ Q_S
        G = torch.bmm(s_rows.transpose(1, 2), a_rows)
        if not rotate_a_tokens:
            G = G @ Q_A
        if not rotate_s_tokens:
            G = Q_S.T @ G
        yield rows, G


def lambda_correction(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, mask: Optional[Tensor]) -> Tensor:
    acc = compute_dtype(a.dtype)
    total = torch.zeros(s.shape[-1], a.shape[-1], dtype=acc, device=a.device)
    for _, G in _rotated_gradients(a, s, Q_A, Q_S, mask):
        total += G.square_().sum(dim=0)
    return total / a.shape[0]


def self_scores(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, inverse: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``sum_ij G~_n,ij^2 * inverse_ij`` per example; ``inverse = 1 / (Lambda + damping)``."""
    acc = compute_dtype(a.dtype)
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    weights = inverse.to(acc).reshape(-1)
    for rows, G in _rotated_gradients(a, s, Q_A, Q_S, mask):
        out[rows] = G.square_().reshape(G.shape[0], -1) @ weights
    return out


def precondition(V: Tensor, Q_A: Tensor, Q_S: Tensor, inverse: Tensor) -> Tensor:
    acc = compute_dtype(V.dtype)
    Q_A, Q_S = Q_A.to(acc), Q_S.to(acc)
    return Q_S @ ((Q_S.T @ V.to(acc) @ Q_A) * inverse.to(acc)) @ Q_A.T


def _token_scores(query, a: Tensor, s: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``(q, b, T)`` per-token scores ``s_t^T P_q a_t``, in chunks of examples. Dense ``P``: one GEMM
    ``a P^T`` over all queries. Low rank ``P = L R``: ``sum_r (L^T s_t)_r (R a_t)_r``."""
    acc = compute_dtype(a.dtype)
    b, T, d_in = a.shape
    d_out = s.shape[-1]
    if isinstance(query, LowRankQuery):
        q, _, width = query.left.shape
        s_map = query.left.to(acc).permute(1, 0, 2).reshape(d_out, q * width)
        a_map = query.right.to(acc).permute(2, 0, 1).reshape(d_in, q * width)
    else:
        q, width = query.shape[0], d_out
        s_map, a_map = None, query.to(acc).reshape(q * d_out, d_in).T
    out = torch.empty(q, b, T, dtype=acc, device=a.device)
    for rows in _chunks(b, 2 * T * q * width * torch.finfo(acc).bits // 8):
        a_rows = _masked(a[rows], None if mask is None else mask[rows], acc).reshape(-1, d_in)
        s_rows = s[rows].to(acc).reshape(-1, d_out)
        a_proj = (a_rows @ a_map).reshape(-1, q, width)
        s_proj = s_rows.unsqueeze(1) if s_map is None else (s_rows @ s_map).reshape(-1, q, width)
        out[:, rows] = (a_proj * s_proj).sum(dim=-1).T.reshape(q, rows.stop - rows.start, T)
    return out


def prefers_token_scores(query, a_shape, d_out: int) -> bool:
    """Whether the per-token contraction costs fewer flops than forming G_n: per token
    ``b T q r (d_in + d_out)`` for rank r, ``b T q d_in d_out`` dense; through G_n
    ``b d_out d_in (T + q)``, plus ``q r d_out d_in`` to multiply out a low-rank query."""
    b, T, d_in = a_shape
    low_rank = isinstance(query, LowRankQuery)
    q = query.left.shape[0] if low_rank else query.shape[0]
    token_cost = b * T * q * (query.left.shape[2] * (d_in + d_out) if low_rank else d_in * d_out)
    gradient_cost = d_out * d_in * (b * (T + q) + (q * query.left.shape[2] if low_rank else 0))
    return token_cost <= gradient_cost


def pairwise_scores(query, a: Tensor, s: Tensor, mask: Optional[Tensor], per_token: bool) -> Tensor:
    """``(q, b)`` (or ``(q, b, T)``) scores by the contraction order with fewer flops
    (`prefers_token_scores`)."""
    b, _, d_in = a.shape
    d_out = s.shape[-1]
    low_rank = isinstance(query, LowRankQuery)
    q = query.left.shape[0] if low_rank else query.shape[0]
    if per_token or prefers_token_scores(query, a.shape, d_out):
        scores = _token_scores(query, a, s, mask)
        return scores if per_token else scores.sum(dim=-1)
    acc = compute_dtype(a.dtype)
    P = (query.left.to(acc) @ query.right.to(acc) if low_rank else query.to(acc)).reshape(q, -1)
    out = torch.empty(q, b, dtype=acc, device=a.device)
    for rows in _chunks(b, d_out * d_in * torch.finfo(acc).bits // 8):
        a_rows = _masked(a[rows], None if mask is None else mask[rows], acc)
        G = torch.bmm(s[rows].to(acc).transpose(1, 2), a_rows)
        out[:, rows] = P @ G.reshape(G.shape[0], -1).T
    return out
