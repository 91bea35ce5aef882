"""Fused FFT long convolution ``y = postgate * (v * k + D v)``, ``v = pregate * u``, by a Monarch FFT.

The length-n DFT (n a power of two, n >= 2L - 1 causal or 2L bidirectional, so the circular
convolution equals the linear one on the first L outputs) factors as n = N1 N2 (Cooley-Tukey /
FlashFFTConv's Monarch form). With time index t = N2 t1 + t2 and frequency f = f1 + N1 f2,

    X[f1 + N1 f2] = sum_t2 F2[t2, f2] * T[f1, t2] * sum_t1 F1[f1, t1] x[t1, t2],

F_m the m-point DFT matrix and T[f1, t2] = exp(-2 pi i f1 t2 / n) the twiddles. Both DFT stages are
matrix products (tl.dot, matrix units); x is u read as an (N1, N2) row-major tile. The spectrum
Z[f1, f2] stays in that order: the kernel's spectrum (`kernel_spectrum`, computed once per call in
torch, shared by the batch) is laid out the same way, and the inverse transform undoes the stages
in reverse with conjugate matrices.

Up to n = `MAX_SIZE`: one program per (batch, channel) row. Only t < L is nonzero on input and
needed on output, and L <= n / 2, so the first and last stage use the top half of F1's rows (the
zero padding is never written). The second stage loops over BLOCK columns of the tile and accumulates Z; the inverse
loops over the same columns and writes y. Dot products: tf32x3 for float32 inputs (float32
accuracy), tf32 for float16/bfloat16 inputs; everything else is float32.

Longer transforms (`three_stage_fft_conv`, n = N0 N1 N2): an outer N0-point stage as torch GEMMs
around complex-row programs of the same kernel (which apply the outer twiddles on load and store);
beyond `MAX_THREE_STAGE_SIZE` the caller uses torch.fft.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _alloc
from ...ssm.reference import _full_kernel

MIN_SIZE = 256  # N1 = N2 = 16: the smallest tile tl.dot takes
# The largest transform one program holds on chip (Z is 2 x N1 x N2 float32), and the largest the
# three-stage path takes (beyond it: the torch.fft path). Tuning constants: the GPU benchmark
# decides where each path stops winning.
MAX_SIZE = 8192
MAX_THREE_STAGE_SIZE = 1 << 17


def transform_size(L: int, bidirectional: bool) -> int:
    """Power-of-two FFT size of the fused kernel: >= 2L - 1 (causal) or 2L, at least `MIN_SIZE`."""
    return max(MIN_SIZE, triton.next_power_of_2(2 * L if bidirectional else 2 * L - 1))


def supports(L: int, bidirectional: bool) -> bool:
    """Whether the Triton paths take length ``L`` (else the caller uses the torch.fft path)."""
    return transform_size(L, bidirectional) <= MAX_THREE_STAGE_SIZE


def _split(n: int) -> Tuple[int, int]:
    """n = N1 N2 with N1 <= N2, both powers of two >= 16."""
    n1 = 1 << ((n.bit_length() - 1) // 2)
    return n1, n // n1


def _dft(rows: int, cols: int, m: int) -> torch.Tensor:
    """``exp(-2 pi i a b / m)`` for ``a < rows``, ``b < cols``, complex128 (angles reduced mod m)."""
    a = torch.arange(rows, dtype=torch.float64)[:, None]
    b = torch.arange(cols, dtype=torch.float64)[None, :]
    return torch.polar(torch.ones(rows, cols, dtype=torch.float64), -2 * torch.pi * torch.remainder(a * b, m) / m)


def _planes(z: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.stack([z.real, z.imag]).to(torch.float32).to(device).contiguous()


@functools.lru_cache(maxsize=16)
def monarch_factors(n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(F1 (2, N1, N1), F2 (2, N2, N2), T (2, N1, N2))`` float32 (re, im) planes of the DFT
    matrices and the twiddles ``exp(-2 pi i f1 t2 / n)``, formed in float64."""
    n1, n2 = _split(n)
    return _planes(_dft(n1, n1, n1), device), _planes(_dft(n2, n2, n2), device), _planes(_dft(n1, n2, n), device)


@functools.lru_cache(maxsize=16)
def outer_factors(n: int, m: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The three-stage path's outer ``N0 = n / m`` point DFT matrix and twiddles
    ``exp(-2 pi i f0 t2 / n)`` as float32 (re, im) planes ``(2, N0, N0)`` and ``(N0, 2, m)``."""
    n0 = n // m
    return _planes(_dft(n0, n0, n0), device), _planes(_dft(n0, m, n), device).transpose(0, 1).contiguous()


def _spectrum(k: torch.Tensor, D: Optional[torch.Tensor], n: int, bidirectional: bool) -> torch.Tensor:
    """``(H, n)`` complex64: the DFT of the length-n circular kernel (plus D, the spectrum of the
    skip ``D v``) divided by n, the inverse transform's scale."""
    spectrum = torch.fft.fft(_full_kernel(k.to(torch.float32), n, bidirectional), n=n)
    if D is not None:
        spectrum = spectrum + D.to(torch.float32).unsqueeze(-1)
    return spectrum / n


def kernel_spectrum(k: torch.Tensor, n: int, bidirectional: bool, correlate: bool = False) -> torch.Tensor:
    """``(2, H, N1, N2)`` float32 planes of `_spectrum` (conjugated for a correlation) at
    ``[f1, f2] = f1 + N1 f2`` (the fused kernel's frequency order)."""
    n1, n2 = _split(n)
    spectrum = _spectrum(k, None, n, bidirectional).reshape(-1, n2, n1).transpose(-1, -2)
    return torch.stack([spectrum.real, -spectrum.imag if correlate else spectrum.imag]).contiguous()


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _load_signal(u_ptr, pre_ptr, offs, mask, HAS_PRE: tl.constexpr):
    """v = pregate * u at ``offs`` in float32, zero where masked (the causal padding)."""
    v = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        v *= tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _fft_conv_fwd_kernel(
    u_ptr, u_im_ptr, pre_ptr, post_ptr, D_ptr, kf_ptr, f1_ptr, f2_ptr, tw_ptr, outer_tw_ptr, y_ptr, y_im_ptr,
    SPECTRA, N0, L,
    N1: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, COMPLEX: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Real rows (``COMPLEX=False``): y = postgate * (circular conv + D v) on the first L of each
    row. Complex rows (``COMPLEX=True``, the middle stage of `three_stage_fft_conv`): the full
    circular convolution of (u, u_im) times the outer twiddles ``outer_tw[r % N0]`` into (y, y_im)
    times their conjugates, L = N1 N2, no gates or skip. Row r uses spectrum ``r % SPECTRA``."""
    row = tl.program_id(0)
    spec = row % SPECTRA
    base = row.to(tl.int64) * L
    t1 = tl.arange(0, ROWS)  # the rows of the (N1, N2) time tile that can hold t < L
    f1 = tl.arange(0, N1)
    f2 = tl.arange(0, N2)
    cols = tl.arange(0, BLOCK)
    # F1[t1, f1] for t1 < ROWS (F1 is symmetric: its transpose serves the forward stage).
    f1_offs = t1[:, None] * N1 + f1[None, :]
    f1r = tl.load(f1_ptr + f1_offs)
    f1i = tl.load(f1_ptr + N1 * N1 + f1_offs)
    f1r_t = tl.trans(f1r)
    f1i_t = tl.trans(f1i)

    zr = tl.zeros((N1, N2), dtype=tl.float32)
    zi = tl.zeros((N1, N2), dtype=tl.float32)
    for c0 in range(0, N2, BLOCK):
        t2 = c0 + cols
        t = t1[:, None] * N2 + t2[None, :]
        v = _load_signal(u_ptr, pre_ptr, base + t, t < L, HAS_PRE)
        if COMPLEX:
            outer = (row % N0) * (2 * L) + t
            v, v_im = _cmul(v, tl.load(u_im_ptr + base + t), tl.load(outer_tw_ptr + outer),
                            tl.load(outer_tw_ptr + outer + L))
        # Stage 1: DFT over t1 (columns t2 of the tile), then the twiddles T[f1, t2].
        yr = tl.dot(f1r_t, v, input_precision=PRECISION)
        yi = tl.dot(f1i_t, v, input_precision=PRECISION)
        if COMPLEX:
            yr -= tl.dot(f1i_t, v_im, input_precision=PRECISION)
            yi += tl.dot(f1r_t, v_im, input_precision=PRECISION)
        tw = f1[:, None] * N2 + t2[None, :]
        yr, yi = _cmul(yr, yi, tl.load(tw_ptr + tw), tl.load(tw_ptr + N1 * N2 + tw))
        # Stage 2: Z += Y[:, t2] F2[t2, :].
        f2_offs = t2[:, None] * N2 + f2[None, :]
        f2r = tl.load(f2_ptr + f2_offs)
        f2i = tl.load(f2_ptr + N2 * N2 + f2_offs)
        zr += tl.dot(yr, f2r, input_precision=PRECISION) - tl.dot(yi, f2i, input_precision=PRECISION)
        zi += tl.dot(yr, f2i, input_precision=PRECISION) + tl.dot(yi, f2r, input_precision=PRECISION)

    kf = spec * (N1 * N2) + f1[:, None] * N2 + f2[None, :]
    zr, zi = _cmul(zr, zi, tl.load(kf_ptr + kf), tl.load(kf_ptr + SPECTRA * (N1 * N2) + kf))

    if HAS_D:
        skip = tl.load(D_ptr + spec).to(tl.float32)
    for c0 in range(0, N2, BLOCK):
        t2 = c0 + cols
        # Inverse stage 2: Y[:, t2] = Z conj(F2)[:, t2], then the conjugate twiddles.
        f2_offs = f2[:, None] * N2 + t2[None, :]
        f2r = tl.load(f2_ptr + f2_offs)
        f2i = tl.load(f2_ptr + N2 * N2 + f2_offs)
        yr = tl.dot(zr, f2r, input_precision=PRECISION) + tl.dot(zi, f2i, input_precision=PRECISION)
        yi = tl.dot(zi, f2r, input_precision=PRECISION) - tl.dot(zr, f2i, input_precision=PRECISION)
        tw = f1[:, None] * N2 + t2[None, :]
        yr, yi = _cmul(yr, yi, tl.load(tw_ptr + tw), -tl.load(tw_ptr + N1 * N2 + tw))
        # Inverse stage 1: conj(F1) Y; for real rows its real part F1r Yr + F1i Yi (1/n is in the spectrum).
        out = tl.dot(f1r, yr, input_precision=PRECISION) + tl.dot(f1i, yi, input_precision=PRECISION)
        t = t1[:, None] * N2 + t2[None, :]
        mask = t < L
        if HAS_D:
            out += skip * _load_signal(u_ptr, pre_ptr, base + t, mask, HAS_PRE)
        if HAS_POST:
            out *= tl.load(post_ptr + base + t, mask=mask, other=0.0).to(tl.float32)
        if COMPLEX:
            out_im = tl.dot(f1r, yi, input_precision=PRECISION) - tl.dot(f1i, yr, input_precision=PRECISION)
            outer = (row % N0) * (2 * L) + t
            out, out_im = _cmul(out, out_im, tl.load(outer_tw_ptr + outer), -tl.load(outer_tw_ptr + outer + L))
            tl.store(y_im_ptr + base + t, out_im)
        tl.store(y_ptr + base + t, out.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(u, pregate, postgate, D, kf, n, y, precision, *, u_im=None, y_im=None, outer_tw=None):
    """One program per row of ``u (rows, L)``: the fused transform of size ``n`` against the
    spectra ``kf (2, SPECTRA, N1, N2)``; complex rows (with the outer twiddles ``(2, N0, n)``) when
    ``u_im`` is given."""
    n1, n2 = _split(n)
    f1, f2, tw = monarch_factors(n, u.device)
    rows, complex_rows = u.numel() // u.shape[-1], u_im is not None
    _fft_conv_fwd_kernel[(rows,)](
        u, u_im if complex_rows else u, pregate if pregate is not None else u,
        postgate if postgate is not None else u, D if D is not None else kf, kf, f1, f2, tw,
        outer_tw if complex_rows else tw, y, y_im if complex_rows else y,
        kf.shape[1], outer_tw.shape[0] if complex_rows else 1, u.shape[-1],
        N1=n1, N2=n2, ROWS=n1 // 2 if n1 >= 32 and not complex_rows else n1, BLOCK=min(n2, 32),
        COMPLEX=complex_rows, HAS_PRE=pregate is not None, HAS_POST=postgate is not None, HAS_D=D is not None,
        PRECISION=precision, num_warps=8 if n >= 4096 else 4,
    )


def fft_conv_fwd(
    u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor], pregate: Optional[torch.Tensor],
    postgate: Optional[torch.Tensor], bidirectional: bool, *, correlate: bool = False,
) -> torch.Tensor:
    """``y (B, H, L)`` in ``u.dtype`` (float32/float16/bfloat16) from ``u (B, H, L)``, ``k (H, L)``
    or ``(2, H, L)``, optional ``D (H,)`` and gates ``(B, H, L)``; requires `supports` (L).
    ``correlate=True``: the adjoint, ``(v star k)[s] = sum_t k[t - s] v[t]`` (conjugate spectrum),
    which is grad v of the convolution."""
    L = u.shape[-1]
    n = transform_size(L, bidirectional)
    precision = "tf32x3" if u.dtype == torch.float32 else "tf32"
    u, D, pregate, postgate = (t if t is None else t.contiguous() for t in (u, D, pregate, postgate))
    if u.numel() == 0:
        return _alloc.empty(u.shape, u.dtype, u.device)
    if n > MAX_SIZE:
        return three_stage_fft_conv(u, k, D, pregate, postgate, bidirectional, n, precision, correlate)
    y = _alloc.empty(u.shape, u.dtype, u.device)
    _launch(u, pregate, postgate, D, kernel_spectrum(k, n, bidirectional, correlate), n, y, precision)
    return y


def three_stage_fft_conv(
    u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor], pregate: Optional[torch.Tensor],
    postgate: Optional[torch.Tensor], bidirectional: bool, n: int, precision: str, correlate: bool,
) -> torch.Tensor:
    """`fft_conv_fwd` for n > `MAX_SIZE`: n = N0 M with M = `MAX_SIZE` (n = N0 N1 N2 in all).

    With t = M t0 + t2 and f = f0 + N0 fm: the outer N0-point DFT over t0 (t0 < N0 / 2: the rest is
    padding) is a torch GEMM; for each (row, f0) one complex-row program of the fused kernel applies
    the twiddles exp(-2 pi i f0 t2 / n), the M-point transform, the product with the spectrum at
    f0 + N0 fm (D folded in), the inverse and the conjugate twiddles; the inverse outer GEMM keeps
    t0 < N0 / 2 (t < L <= n / 2). Scratch: four float32 (B, H, N0, M) planes."""
    Bsz, H, L = u.shape
    m = MAX_SIZE
    n0, half = n // m, n // m // 2
    n1, n2 = _split(m)
    dft0, twiddle = outer_factors(n, m, u.device)
    v = torch.zeros(Bsz, H, half, m, device=u.device)
    v.view(Bsz, H, half * m)[..., :L] = u if pregate is None else u.float() * pregate
    # Outer stage over t0 < N0 / 2 (the rest is padding): (2, B, H, N0, M), the planes of F0[:, :half] v.
    outer = torch.matmul(dft0[:, None, None, :, :half], v)
    # f = f0 + N0 (f1 + N1 f2): the spectra of the (h, f0) rows as (H N0, N1, N2) tiles.
    spectrum = _spectrum(k, D, n, bidirectional)
    spectrum = (spectrum.conj_physical() if correlate else spectrum).reshape(H, n2, n1, n0).permute(0, 3, 2, 1)
    spectrum = spectrum.reshape(H * n0, n1, n2)
    kf = torch.stack([spectrum.real, spectrum.imag]).contiguous()
    inner = torch.empty(2, Bsz, H, n0, m, device=u.device)
    # The middle stage (twiddles in, conjugate twiddles out) on the (b, h, f0) rows.
    _launch(outer[0], None, None, None, kf, m, inner[0], precision, u_im=outer[1], y_im=inner[1], outer_tw=twiddle)
    # Inverse outer stage, t0 < N0 / 2: Re(conj(F0) W) = F0r Wr + F0i Wi.
    z = torch.matmul(dft0[0, :half], inner[0]) + torch.matmul(dft0[1, :half], inner[1])
    z = z.reshape(Bsz, H, half * m)[..., :L]
    return (z if postgate is None else z * postgate).to(u.dtype)
