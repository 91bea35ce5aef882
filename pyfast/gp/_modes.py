"""Mode products on a row-major grid vector with torch's GEMMs, without permute copies.

A grid vector ``x`` of shape ``(n_1 * ... * n_D, B)`` viewed as ``(A, n_d, C)`` with
``A = n_1 ... n_{d-1}`` and ``C = n_{d+1} ... n_D * B`` is a batch of ``A`` matrices; applying
``M (m, n_d)`` along mode ``d`` is the batched GEMM ``M @ x[a]`` into a fresh ``(A, m, C)`` tensor,
which is again row-major in the new grid. The first mode (``A = 1``) and a last mode without
batch columns (``C = 1``) are single GEMMs; a middle mode is one batched GEMM (``bmm`` over a
stride-0 batch of ``M``). A mode-major copy
``(n_d, A C)`` would turn a middle mode into one GEMM (64^3 grid, 2 CPU threads, in isolation:
0.7 vs 0.95 ms), but its two extra grid-sized buffers cost more than that inside a solve, where
fresh buffers are page-faulted in again and again (about 1000 faults per 64^3 solve).
These serve every case that `kron_eigen_apply` (the C++ kernel for square factors in float32 /
float64 on AVX2 CPUs) does not cover: rectangular factors, other dtypes, gradients of factors.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _ext

# apply(matrix, x, grid, mode, cols, out): one mode product, written into the flat buffer ``out``
# (at least the output's size) when given, else into a fresh tensor.
ApplyMode = Callable[[Tensor, Tensor, Sequence[int], int, int, Optional[Tensor]], Tensor]


def apply_mode(matrix: Tensor, x: Tensor, grid: Sequence[int], mode: int, cols: int, out: Optional[Tensor] = None) -> Tensor:
    """``matrix (m, n_mode)`` along ``mode`` of ``x (N, cols)`` (contiguous, row-major grid ``grid``);
    returns ``(N / n_mode * m, cols)`` contiguous, in the flat buffer ``out`` when given."""
    a = math.prod(grid[:mode])
    n = grid[mode]
    c = math.prod(grid[mode + 1:]) * cols
    m = matrix.shape[0]
    into = (lambda *shape: None) if out is None else (lambda *shape: out[: math.prod(shape)].view(shape))  # noqa: E731
    if c == 1:
        res = torch.mm(x.reshape(a, n), matrix.t(), out=into(a, m))
    elif a == 1:
        res = torch.mm(matrix, x.reshape(n, c), out=into(m, c))
    else:  # stride-0 batch of M: matmul would materialize the broadcast copy
        res = torch.bmm(matrix.expand(a, m, n), x.reshape(a, n, c), out=into(a, m, c))
    return res.view(a * m * math.prod(grid[mode + 1:]), cols)


def kron_apply(
    matrices: Sequence[Tensor], x: Tensor, grid: Sequence[int], cols: int, skip: int = -1,
    apply: ApplyMode = apply_mode, consume: bool = False,
) -> Tensor:
    """``(M_1 (x) ... (x) M_D) x`` by one mode product per factor (``apply``: this module's
    `apply_mode` or a kernel backend's); factor ``skip`` is left out (identity along that mode).

    The products alternate between two buffers allocated here (the result is one of them), and
    with ``consume`` (``x`` is not used after the call) ``x`` itself serves as the second.
    """
    steps = [(d, mat) for d, mat in enumerate(matrices) if d != skip]
    shape: List[int] = list(grid)
    sizes = []
    for d, mat in steps:
        shape[d] = mat.shape[0]
        sizes.append(math.prod(shape) * cols)
    buffers: List[Optional[Tensor]] = [None, None]
    for parity in (0, 1):
        need = max(sizes[parity::2], default=0)
        if parity == 1 and consume and x.is_contiguous() and x.numel() >= need:
            buffers[1] = x.view(-1)
        elif need:
            buffers[parity] = x.new_empty(need)
    shape = list(grid)
    for i, (d, mat) in enumerate(steps):
        x = apply(mat, x, shape, d, cols, buffers[i % 2])
        shape[d] = mat.shape[0]
    return x


def kernel_covers(x: Tensor, matrices: Sequence[Tensor]) -> bool:
    """Whether `kron_eigen_apply` runs for ``x (N, B)`` and these factors: CPU, float32 / float64,
    contiguous, square non-empty factors of ``x``'s dtype, and a CPU with AVX2 + FMA."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
        and all(m.dtype == x.dtype and m.shape[0] == m.shape[1] > 0 for m in matrices)
        and _ext.cpu is not None and _ext.cpu.gp_kron_eigen_apply_available()
    )


def kron_eigen_apply(
    q: Sequence[Tensor], qt: Sequence[Tensor], x: Tensor, rotate_in: bool, rotate_out: bool,
    spectrum: Optional[Tuple[List[int], float, float]] = None, out: Optional[Tensor] = None,
) -> Tensor:
    """``Q diag(L^p) Q^T x`` with ``Q = Q_1 (x) ... (x) Q_D`` by the C++ kernel
    (csrc/cpu/gp/kron_eigen_apply.cpp), or a half: ``diag(L^p) Q^T x`` (no ``rotate_out``) or
    ``Q x`` (no ``rotate_in``: any square Kronecker product).

    Args:
        q, qt: ``Q_d`` and ``Q_d^T``, ``(n_d, n_d)`` contiguous, ``x``'s dtype.
        x: ``(n_1 ... n_D, B)`` contiguous (see `kernel_covers`).
        spectrum: ``(addresses of the float64 factor eigenvalues, noise, p)``, ``p`` -1 or -1/2,
            ``L = noise + lam_1 (x) ... (x) lam_D``; None: no scaling. Needs ``rotate_in``.
        out: the result's buffer (may be ``x``), else a fresh tensor.

    One grid-sized buffer; a 64^3 grid is read and written three times (leading mode, the two
    trailing modes in cache, leading mode), where one mode product per pass takes seven.
    """
    out = torch.empty_like(x) if out is None else out
    lams, noise, power = spectrum if spectrum is not None else ([], 0.0, -1.0)
    _ext.cpu.gp_kron_eigen_apply(
        _ext.DTYPE_TAG[x.dtype], x.data_ptr(), out.data_ptr(), x.shape[1], [m.data_ptr() for m in q],
        [m.data_ptr() for m in qt], [m.shape[0] for m in q], rotate_in, rotate_out, lams, noise, power,
    )
    return out


def mode_gram(left: Tensor, right: Tensor, grid: Sequence[int], mode: int, cols: int, p: int, q: int) -> Tensor:
    """``sum`` over every axis but ``mode`` of ``left[..i..] * right[..j..]``: the ``(p, q)`` matrix
    ``unfold_mode(left) @ unfold_mode(right)^T``. Both are ``(rows, cols)`` on grids equal to
    ``grid`` except along ``mode``, where they have ``p`` and ``q`` points."""
    if left.numel() == 0 or right.numel() == 0:
        return left.new_zeros(p, q)
    a = math.prod(grid[:mode])
    c = math.prod(grid[mode + 1:]) * cols
    l3, r3 = left.reshape(a, p, c), right.reshape(a, q, c)
    if a == 1:
        return l3[0] @ r3[0].transpose(0, 1)
    if c == 1:
        return l3[:, :, 0].transpose(0, 1) @ r3[:, :, 0]
    return (l3 @ r3.transpose(1, 2)).sum(0)


def mode_sum(x: Tensor, grid: Sequence[int], mode: int) -> Tensor:
    """Sum of ``x (N,)`` over every grid axis but ``mode``: shape ``(n_mode,)``."""
    a = math.prod(grid[:mode])
    n = grid[mode]
    return x.reshape(a, n, -1).sum((0, 2))
