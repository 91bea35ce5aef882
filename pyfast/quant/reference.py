"""Specification of power-exponent quantization (PowerQuant / NUPES) in plain torch.

Every kernel of `pyfast.quant` is tested against these functions; they take any floating dtype
(float64 included) and compute in float32, or float64 for float64 input.

The grid. With ``L = 2**bits`` codes ``c = 0 .. L-1`` and exponent ``a > 0`` the normalized levels are

    symmetric=True   t_c = (2c - (L-1)) / (L-1)      all L levels, symmetric, no exact zero (midrise)
    symmetric=False  t_c = (c - L/2) / (L/2)         all L levels, exact zero, one more negative level

and the dequantized value of code ``c`` in a group with scale ``s`` is ``s * sign(t_c) |t_c|^(1/a)``
(the power automorphism ``x -> sign(x)|x|^a`` maps weights onto the uniform grid ``t``).
Quantizing ``w`` rounds in the transformed domain::

    u = clamp(sign(w / s) |w / s|^a, t_0, t_{L-1})
    c = round((u - t_0) / (t_1 - t_0))          ties to even (torch.round, C nearbyint)

so exponent 1 is exactly uniform quantization. The exponent is one per tensor (the default), or one
per group (``exponent`` a ``(rows, groups)`` tensor): the tensor then keeps its distinct values and
a ``(rows, groups)`` uint8 index into them, and each group is quantized exactly as a per-tensor
quantization with its own exponent would quantize it. Scales are per group of ``group_size`` consecutive
elements along ``axis``: ``s = clip * max|w|`` over the group, ``clip`` a float or searched per group
(`search_clip`). With ``symmetric=False`` and ``a = 1/2`` the value is ``s/(L/2)^2 * q|q|``,
``q = c - L/2``: at 4 bits an integer in [-64, 49] times ``s/64``, exact in int8.

Activation fake quantization (`quantize_activations`, W4A8-style evaluation): each row of x (a
token) gets the dynamic scale ``s = max|x_row|`` and its values are replaced by their dequantized
codes on the grid with an exact zero (``symmetric=False``) of ``act_bits`` levels and their own
exponent; at 8 bits and exponent 1 that is per-token absmax int8 with levels ``q s / 128``,
``q in [-128, 127]``. `power_linear` applies it to x before the product; its gradient is the
straight-through estimator (identity: d fq(x) / dx := 1).

Packed layout (`pack_codes`): each row of codes is a little-endian bit stream, code ``k`` in bits
``[bits*k, bits*k + bits)``, rows padded with zero codes to a multiple of 8 codes, so a row takes
``bits * ceil(K / 8)`` bytes and every 8 codes fill exactly ``bits`` bytes (4-bit: two codes per
byte, low nibble first; 3-bit: 8 codes per 3 bytes; 8-bit: one code per byte).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

SUPPORTED_BITS = (3, 4, 8)
DEFAULT_EXPONENTS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.50 .. 1.00
DEFAULT_CLIPS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.50 .. 1.00
_CHUNK_ELEMENTS = 1 << 24  # bound on the batched search tensors (elements)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalized_grid(bits: int, symmetric: bool = True, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(2**bits,)`` the uniform grid ``t_c`` of the transformed domain, ascending."""
    L = 2**bits
    c = torch.arange(L, dtype=dtype)
    return (2 * c - (L - 1)) / (L - 1) if symmetric else (c - L / 2) / (L / 2)


def levels(bits: int, exponent: Union[float, Tensor], symmetric: bool = True, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(2**bits,)`` dequantized values of the codes for scale 1: ``sign(t_c) |t_c|^(1/a)``.

    A tensor ``exponent`` of shape ``(E,)`` gives ``(E, 2**bits)``."""
    t = normalized_grid(bits, symmetric, dtype)
    if isinstance(exponent, Tensor):
        exponent = exponent.to(dtype)[..., None]
    return torch.sign(t) * t.abs() ** (1.0 / exponent)


def grid_table(bits: int, exponent: Union[float, Tuple[float, ...]], symmetric: bool = True,
               dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Tensor:
    """`levels` computed in float64, then cast: ``(2**bits,)`` for one exponent, ``(E, 2**bits)``
    for a tuple of E exponents (row e: ``exponent[e]``)."""
    if isinstance(exponent, tuple):
        table = torch.stack([levels(bits, a, symmetric) for a in exponent])
    else:
        table = levels(bits, exponent, symmetric)
    return table.to(dtype=dtype, device=device)


MAX_GROUP_EXPONENTS = 256  # distinct per-group exponents of one tensor (uint8 index)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored as packed power-grid codes with per-group scales.

    Attributes:
        codes: ``(rows, bits * ceil(K / 8))`` uint8, rows = the tensor moved to ``axis`` last and
            flattened to 2-D ``(rows, K)`` (for a Linear weight ``(N, K)``: rows = N).
        scales: ``(rows, K // group_size)`` float32 (float64 when quantized from float64).
        exponent: the exponent (a float), or with per-group exponents the tuple of the distinct
            exponents, ascending (at most 256).
        exponent_index: None (one exponent), or ``(rows, K // group_size)`` uint8: group ``(r, g)``
            uses ``exponent[exponent_index[r, g]]``.
        bits, group_size, symmetric: the grid (see the module docstring).
        shape: the original shape; axis: the grouped axis (non-negative).
    """

    codes: Tensor
    scales: Tensor
    exponent: Union[float, Tuple[float, ...]]
    bits: int
    group_size: int
    shape: Tuple[int, ...]
    axis: int
    symmetric: bool = True
    exponent_index: Optional[Tensor] = None

    @property
    def per_group(self) -> bool:
        """True when every group has its own exponent (`exponent_index` set)."""
        return self.exponent_index is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        """K, the length of the grouped axis."""
        return self.shape[self.axis]

    def group_exponents(self) -> Tensor:
        """``(rows, groups)`` float64: the exponent of every group."""
        if not self.per_group:
            return torch.full(self.scales.shape, self.exponent, dtype=torch.float64, device=self.device)
        return torch.tensor(self.exponent, dtype=torch.float64, device=self.device)[self.exponent_index.long()]

    def table(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized value of each code at scale 1 (computed in float64): ``(2**bits,)``, or
        ``(len(exponent), 2**bits)`` with per-group exponents (row e: exponent ``exponent[e]``)."""
        return grid_table(self.bits, self.exponent, self.symmetric, dtype, self.device)

    def to(self, device: Union[str, torch.device]) -> "QuantizedTensor":
        index = None if self.exponent_index is None else self.exponent_index.to(device)
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device), exponent_index=index)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The stored tensor (`pyfast.quant.dequantize`: the kernels where they cover ``q``)."""
        from .ops import dequantize as fast_dequantize  # ops builds on this module

        return fast_dequantize(self, dtype)


def _to_groups(w: Tensor, axis: int, group_size: int) -> Tensor:
    """``(rows, groups, group_size)`` view of ``w`` with ``axis`` moved last."""
    w2 = w.movedim(axis, -1).reshape(-1, w.shape[axis])
    return w2.reshape(w2.shape[0], w.shape[axis] // group_size, group_size)


def _from_rows(rows: Tensor, shape: Sequence[int], axis: int) -> Tensor:
    moved = list(shape)
    moved.append(moved.pop(axis))
    return rows.reshape(moved).movedim(-1, axis)


def _codes(wg: Tensor, scale: Tensor, bits: int, exponent: float, symmetric: bool) -> Tensor:
    """Codes (same shape as ``wg``, int64) of weights ``wg`` with broadcastable ``scale``."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = wg / safe
    return _grid_codes(torch.sign(y) * y.abs() ** exponent, bits, symmetric)


def _grid_codes(u: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Codes of transformed values ``u``: the nearest grid point, ties to even."""
    L = 2**bits
    if symmetric:
        pos = (u.clamp(-1.0, 1.0) + 1.0) * ((L - 1) / 2)
    else:
        pos = u.clamp(-1.0, 1.0 - 2.0 / L) * (L / 2) + L / 2
    return torch.round(pos).clamp(0, L - 1).to(torch.int64)


def _group_codes(wg: Tensor, scale: Tensor, bits: int, exponent: Tensor, symmetric: bool):
    """Per-group exponents ``(rows, groups)``: codes of each group with its own exponent, the
    distinct exponents (tuple, ascending) and the uint8 index of each group into them."""
    values, index = torch.unique(exponent.detach().to(torch.float64).cpu(), sorted=True, return_inverse=True)
    index = index.to(wg.device)
    codes = torch.empty(wg.shape, dtype=torch.int64, device=wg.device)
    exponents = tuple(float(v) for v in values)
    for e, a in enumerate(exponents):
        chosen = index == e
        codes[chosen] = _codes(wg[chosen], scale[chosen][:, None], bits, a, symmetric)
    return codes, exponents, index.to(torch.uint8)


def power_quantize(
    w: Tensor,
    bits: int,
    exponent: Union[float, Tensor],
    *,
    group_size: Optional[int] = 128,
    axis: int = -1,
    symmetric: bool = True,
    clip: Union[float, Tensor] = 1.0,
) -> QuantizedTensor:
    """Quantize ``w`` onto the power grid. ``group_size=None`` means one group per row (per channel).

    ``exponent``: a float, or a ``(rows, groups)`` tensor of per-group exponents (module docstring).
    ``clip``: scale factor on the group absmax, a float or a ``(rows, groups)`` tensor (from
    `search_clip` / `search_exponent`). No validation here (see `pyfast.quant.power_quantize`)."""
    axis = axis % w.dim()
    K = w.shape[axis]
    group_size = K if group_size is None else group_size
    acc = compute_dtype(w.dtype)
    wg = _to_groups(w.detach().to(acc), axis, group_size)
    clip_t = torch.as_tensor(clip, dtype=acc, device=w.device)
    scale = wg.abs().amax(dim=-1) * clip_t if wg.numel() else wg.new_zeros(wg.shape[:2])
    index = None
    if isinstance(exponent, Tensor):
        codes, exponent, index = _group_codes(wg, scale, bits, exponent, symmetric)
    else:
        codes, exponent = _codes(wg, scale[..., None], bits, exponent, symmetric), float(exponent)
    packed = pack_codes(codes.reshape(codes.shape[0], K), bits)
    return QuantizedTensor(packed, scale.contiguous(), exponent, bits, group_size, tuple(w.shape), axis, symmetric, index)


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The tensor of ``q.shape`` holding ``scale * level[code]``, in ``dtype`` (default: scales' dtype)."""
    acc = q.scales.dtype
    codes = unpack_codes(q.codes, q.bits, q.cols).reshape(q.rows, q.cols // q.group_size, q.group_size)
    if q.per_group:  # row e of the (E, L) table for groups of exponent e
        codes = codes + (q.exponent_index.long() << q.bits)[..., None]
    values = q.table(acc).reshape(-1)[codes] * q.scales[..., None]
    return _from_rows(values.reshape(q.rows, q.cols), q.shape, q.axis).to(dtype or acc)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``(rows, K)`` codes in ``[0, 2**bits)`` -> ``(rows, bits * ceil(K / 8))`` uint8 (module docstring)."""
    rows, K = codes.shape
    blocks = -(-K // 8)
    padded = torch.zeros(rows, blocks * 8, dtype=torch.int64, device=codes.device)
    padded[:, :K] = codes
    shifts = bits * torch.arange(8, device=codes.device)
    word = (padded.reshape(rows, blocks, 8) << shifts).sum(dim=-1, keepdim=True)  # disjoint bits: sum == or
    out = (word >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
    return out.reshape(rows, blocks * bits).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, K: int) -> Tensor:
    """Inverse of `pack_codes`: ``(rows, K)`` int64 codes."""
    rows = packed.shape[0]
    blocks = packed.shape[1] // bits
    b = packed.to(torch.int64).reshape(rows, blocks, bits)
    word = (b << (8 * torch.arange(bits, device=packed.device))).sum(dim=-1, keepdim=True)
    codes = (word >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)
    return codes.reshape(rows, blocks * 8)[:, :K]


def quantize_activations(x: Tensor, bits: int, exponent: float) -> Tensor:
    """Fake-quantized ``x (..., K)`` in x.dtype (module docstring): per-row absmax scale, grid with an
    exact zero, computed in the compute dtype of x. Not differentiable (see `straight_through`)."""
    acc = compute_dtype(x.dtype)
    xf = x.detach().to(acc)
    scale = xf.abs().amax(dim=-1, keepdim=True) if xf.numel() else xf.new_zeros(*xf.shape[:-1], 1)
    codes = _codes(xf, scale, bits, exponent, symmetric=False)
    return (levels(bits, exponent, symmetric=False).to(dtype=acc, device=x.device)[codes] * scale).to(x.dtype)


def straight_through(x: Tensor, value: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``x`` in the backward (``x - x.detach()`` is 0)."""
    return value.detach() + (x - x.detach())


def power_linear(x: Tensor, q: QuantizedTensor, act_bits: Optional[int] = None, act_exponent: float = 1.0) -> Tensor:
    """``y = x W^T`` with ``W = dequantize(q)`` of shape ``(N, K)``: x ``(..., K)`` -> ``(..., N)`` in
    ``x.dtype``, computed in the compute dtype of x. With ``act_bits``, x is first fake-quantized
    (`quantize_activations`, straight-through gradient)."""
    if act_bits is not None:
        x = straight_through(x, quantize_activations(x, act_bits, act_exponent))
    acc = compute_dtype(x.dtype)
    return torch.nn.functional.linear(x.to(acc), dequantize(q, acc)).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Search of the exponent and the clip
# --------------------------------------------------------------------------------------------------


class SearchResult(NamedTuple):
    """``exponent``: the best candidate, or with ``per_group=True`` a ``(rows, groups)`` float64
    tensor of each group's best candidate; ``clip``: ``(rows, groups)`` best clip per group for it;
    ``errors``: ``(E,)`` error of every exponent candidate used for the whole tensor (each with its
    own best clips)."""

    exponent: Union[float, Tensor]
    clip: Tensor
    errors: Tensor


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return range(0, rows, step), step


def search_exponent(
    w: Tensor,
    bits: int,
    *,
    group_size: Optional[int] = 128,
    candidates: Sequence[float] = DEFAULT_EXPONENTS,
    clips: Sequence[float] = DEFAULT_CLIPS,
    x: Optional[Tensor] = None,
    symmetric: bool = True,
    per_group: bool = False,
) -> SearchResult:
    """Joint search of the exponent (per tensor or per group) and the clip (per group) of a ``(N, K)`` weight.

    For every exponent ``a`` (E candidates) and clip ``r`` (C candidates) all at once, the weight is
    quantized with ``s = r * absmax``; each group keeps the clip of least error, and ``a`` is scored
    by the summed error of its best clips. The error is the weight error ``||W - Q(W)||^2``, or with
    calibration inputs ``x (..., K)`` the output error ``||x W^T - x Q(W)^T||^2 = sum_n d_n H d_n^T``,
    ``H = x^T x``, ``d_n`` the row error; clips are then chosen per group by the diagonal of ``H``
    (the group-separable part). Groups are processed in row chunks to bound memory.

    ``per_group=True``: every group keeps the (exponent, clip) pair of least group error from the
    same pass (with ``x``: the diagonal-of-H group error); ties go to the first candidate.
    """
    acc = compute_dtype(w.dtype)
    K = w.shape[1]
    group_size = K if group_size is None else group_size
    wg = _to_groups(w.detach().to(acc), 1, group_size)  # (N, G, g)
    a = torch.tensor(candidates, dtype=acc, device=w.device)
    r = torch.tensor(clips, dtype=acc, device=w.device)
    table = levels(bits, a, symmetric, acc).to(w.device)  # (E, L)
    L = 2**bits
    step_inv, offset = ((L - 1) / 2, (L - 1) / 2) if symmetric else (L / 2, L / 2)
    table_rows = (torch.arange(len(candidates), dtype=acc, device=w.device) * L)[:, None, None, None, None]
    H = weight = None
    if x is not None:
        xf = x.detach().reshape(-1, K).to(acc)
        H = xf.T @ xf
        weight = H.diagonal().reshape(1, -1, group_size)
    N, G, _ = wg.shape
    errors = torch.zeros(len(candidates), dtype=acc, device=w.device)
    choices = []  # per row chunk: (E, n, G) index of the best clip of every group, per exponent
    group_best = []  # per row chunk: (n, G) index of the best exponent of every group (per_group)
    chunks, step = _row_chunks(N, len(candidates) * len(clips) * K)
    for start in chunks:
        block = wg[start : start + step]  # (n, G, g)
        absmax = block.abs().amax(dim=-1, keepdim=True)
        y = block / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        # Grid position of sign(y)|y / r|^a (module docstring) as one multiply-add on sign(y)|y|^a,
        # computed once per exponent: pos = sign(y)|y|^a * r^-a * step_inv + offset.
        powered = (torch.sign(y) * y.abs() ** a[:, None, None, None])[:, None]  # (E, 1, n, G, g)
        slope = (r[None, :] ** -a[:, None] * step_inv)[..., None, None, None]  # (E, C, 1, 1, 1)
        pos = torch.addcmul(torch.full((), offset, dtype=acc, device=w.device), powered, slope)
        pos = pos.round_().clamp_(0, L - 1).add_(table_rows)  # ties to even; row of the exponent's table
        deq = table.reshape(-1)[pos.long()]  # (E, C, n, G, g)
        diff = torch.addcmul(-block, deq, absmax * r[:, None, None, None])  # Q(w) - w
        sq = diff.square()
        group_err = (sq if H is None else sq.mul_(weight)).sum(dim=-1)  # (E, C, n, G)
        best = group_err.argmin(dim=1, keepdim=True)  # (E, 1, n, G)
        if per_group:
            group_best.append(group_err.gather(1, best)[:, 0].argmin(dim=0))
        if H is None:
            errors += group_err.gather(1, best).sum(dim=(1, 2, 3))
        else:
            d = diff.gather(1, best[..., None].expand(-1, -1, -1, -1, group_size)).flatten(start_dim=-2)  # (E,1,n,K)
            errors += ((d @ H) * d).sum(dim=(1, 2, 3))
        choices.append(best[:, 0])
    if not choices:
        exponent = wg.new_ones(N, G, dtype=torch.float64) if per_group else float(candidates[int(errors.argmin())])
        return SearchResult(exponent, wg.new_ones(N, G), errors)
    clip_index = torch.cat(choices, dim=1)  # (E, N, G)
    if per_group:
        e = torch.cat(group_best, dim=0)  # (N, G)
        exponent = torch.tensor(candidates, dtype=torch.float64, device=w.device)[e]
        return SearchResult(exponent, r[clip_index.gather(0, e[None])[0]], errors)
    winner = int(errors.argmin())
    return SearchResult(float(candidates[winner]), r[clip_index[winner]], errors)


def search_clip(
    w: Tensor,
    bits: int,
    exponent: float,
    *,
    group_size: Optional[int] = 128,
    clips: Sequence[float] = DEFAULT_CLIPS,
    x: Optional[Tensor] = None,
    symmetric: bool = True,
) -> Tensor:
    """``(rows, groups)`` best clip per group for a fixed exponent (see `search_exponent`)."""
    return search_exponent(w, bits, group_size=group_size, candidates=(exponent,), clips=clips, x=x, symmetric=symmetric).clip
