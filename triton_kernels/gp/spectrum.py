"""Eigenbasis scaling and log-determinant of ``K_1 (x) ... (x) K_D + noise I`` with the N
eigenvalues ``L = noise + lam_1 (x) ... (x) lam_D`` computed on the fly (never stored).

Each element's grid index is split into per-mode indices with the row-major strides, and its
eigenvalue is the left-to-right product of the factor eigenvalues (float64) plus the noise.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _eigenvalue(rows, lams_ptr, starts_ptr, sizes_ptr, strides_ptr, noise, D: tl.constexpr):
    """float64 ``L`` at grid indices ``rows`` (int64)."""
    prod = tl.full(rows.shape, 1.0, tl.float64)
    for d in tl.static_range(D):
        n = tl.load(sizes_ptr + d)
        index = (rows // tl.load(strides_ptr + d)) % n
        prod = prod * tl.load(lams_ptr + tl.load(starts_ptr + d) + index)
    return prod + noise


@triton.jit
def _scale_kernel(z_ptr, lams_ptr, starts_ptr, sizes_ptr, strides_ptr, noise, total, cols,
                  ROOT: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """``z.flat[e] *= L[e // cols]^p`` (p = -1, or -1/2 when ``ROOT``) for ``BLOCK`` elements."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    L = _eigenvalue(tl.where(live, e // cols, 0), lams_ptr, starts_ptr, sizes_ptr, strides_ptr, noise, D)
    scale = 1.0 / tl.sqrt(L) if ROOT else 1.0 / L
    z = tl.load(z_ptr + e, mask=live)
    tl.store(z_ptr + e, z * scale.to(z.dtype), mask=live)


@triton.jit
def _log_sum_kernel(partial_ptr, lams_ptr, starts_ptr, sizes_ptr, strides_ptr, noise, N,
                    D: tl.constexpr, BLOCK: tl.constexpr):
    """``partial[program] = sum log L`` over ``BLOCK`` grid points."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < N
    L = _eigenvalue(tl.where(live, rows, 0), lams_ptr, starts_ptr, sizes_ptr, strides_ptr, noise, D)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(live, tl.log(L), 0.0), axis=0))


class SpectrumLayout(NamedTuple):
    """The factor eigenvalues as the kernels read them, built once per grid: all eigenvalues
    (float64, concatenated) and each mode's start, size and row-major stride, on the device."""

    values: torch.Tensor
    starts: torch.Tensor
    sizes: torch.Tensor
    strides: torch.Tensor
    num_points: int


def spectrum_layout(lams: Sequence[torch.Tensor]) -> SpectrumLayout:
    sizes: List[int] = [l.numel() for l in lams]
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    strides = [math.prod(sizes[d + 1:]) for d in range(len(sizes))]
    device = lams[0].device
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    values = torch.cat([l.to(torch.float64) for l in lams])
    return SpectrumLayout(values, as_tensor(starts), as_tensor(sizes), as_tensor(strides), math.prod(sizes))


def scale_by_spectrum(z: torch.Tensor, layout: SpectrumLayout, noise: float, power: float) -> torch.Tensor:
    """``z (N, B)`` contiguous, float32/float64: ``z *= L^power`` in place (power -1 or -1/2)."""
    total = z.numel()
    if total:
        _scale_kernel[(triton.cdiv(total, _BLOCK),)](
            z, *layout[:4], noise, total, z.shape[1], ROOT=power == -0.5, D=layout.sizes.numel(), BLOCK=_BLOCK,
        )
    return z


def log_spectrum_sum(layout: SpectrumLayout, noise: float) -> torch.Tensor:
    """``sum log L`` as a float64 scalar tensor (per-block partial sums, added in a fixed order)."""
    programs = triton.cdiv(layout.num_points, _BLOCK)
    partial = torch.empty(programs, dtype=torch.float64, device=layout.values.device)
    _log_sum_kernel[(programs,)](partial, *layout[:4], noise, layout.num_points, D=layout.sizes.numel(), BLOCK=_BLOCK)
    return partial.sum()
