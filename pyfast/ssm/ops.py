"""SSM ops: validation, `torch.library` custom ops, autograd, backend dispatch.

The custom ops take and return real tensors only (complex parameters travel as ``(..., 2)``
``view_as_real`` pairs), so ``torch.compile`` graphs hold no complex values: the complex
arithmetic lives inside the ops. Backward passes are custom ops too.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._backend import backend_for, register_op
from .._checks import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_tensor, value_checks_enabled
from . import _fft_conv, reference
from .companion import companion_kernel_fft, is_stable
from .reference import DISCRETIZATIONS, compute_dtype

REAL_DTYPES = (torch.float32, torch.float64)
# The complex precision of A and C for each dtype of dt (float16/bfloat16 kernels compute in float32).
COMPLEX_OF = {
    torch.float32: torch.complex64, torch.float64: torch.complex128,
    torch.float16: torch.complex64, torch.bfloat16: torch.complex64,
}

MAX_LENGTH = 1 << 20

register_op("ssm.s4d_kernel", cpu=FLOAT_DTYPES, triton=(torch.float32, torch.float16, torch.bfloat16))
# fft_conv: the CPU path is torch's FFT (pyfast/ssm/_fft_conv.py); CUDA tensors run the fused Monarch
# FFT kernel (triton_kernels/ssm/fft_conv.py) up to its on-chip length, the torch.fft path beyond.
register_op(
    "ssm.fft_conv", cpu=FLOAT_DTYPES, triton=(torch.float32, torch.float16, torch.bfloat16),
    cpu_path="torch.fft at a 5-smooth size, D folded into the kernel spectrum, the gates fused",
)

_KERNEL_MODULES = {"cpu": "pyfast.ssm._cpu", "triton": "pyfast.triton_kernels.ssm"}


def _kernels(backend: str):
    """The module implementing the kernel contract for ``backend`` (imported on first use)."""
    return importlib.import_module(_KERNEL_MODULES[backend])


def _eager_value_checks() -> bool:
    """Value checks run eagerly only (under torch.compile they would break the graph)."""
    return value_checks_enabled() and not torch.compiler.is_compiling()


def check_ssm_params(fn: str, dt: Tensor, A: Tensor, C: Tensor) -> None:
    """``dt (H,)`` real, ``A (H, N)`` and ``C (channels, H, N)`` complex of the matching precision
    (`COMPLEX_OF`), finite, ``dt > 0`` and ``Re(A) < 0``."""
    check_tensor(fn, "dt", dt, ndim=1, dims="(H,)", dtypes=FLOAT_DTYPES)
    complex_dtype = COMPLEX_OF[dt.dtype]
    for name, value, ndim, dims in (("A", A, 2, "(H, N)"), ("C", C, 3, "(channels, H, N)")):
        check_tensor(fn, name, value, ndim=ndim, dims=dims)
        if value.dtype != complex_dtype:
            raise TypeError(
                f"{fn}: {name} must be complex with the precision of dt ({complex_dtype} for dt {dt.dtype}), "
                f"got {value.dtype}"
            )
    H, N = A.shape
    if dt.shape[0] != H or C.shape[1:] != (H, N):
        raise ValueError(
            f"{fn}: dt (H,), A (H, N) and C (channels, H, N) must agree on H and N, got dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, C {tuple(C.shape)}"
        )
    check_same_device(fn, dt=dt, A=A, C=C)
    if not _eager_value_checks():
        return
    for name, value in (("dt", dt), ("A", A), ("C", C)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{fn}: {name} has non-finite values (NaN or Inf)")
    if dt.numel() and not bool((dt > 0).all()):
        raise ValueError(f"{fn}: dt must be > 0 (the linear step size; pass exp(log_dt)), got min {float(dt.min())}")
    if A.numel() and not bool((A.real < 0).all()):
        raise ValueError(
            f"{fn}: A must have negative real parts (Re(A) >= 0 is an unstable, non-decaying SSM), "
            f"got max Re(A) = {float(A.real.max())}"
        )


# --------------------------------------------------------------------------------------------------
# s4d_kernel
# --------------------------------------------------------------------------------------------------


def _discretize_pairs(dt: Tensor, A: Tensor, C: Tensor, discretization: str) -> Tuple[Tensor, Tensor]:
    """`reference.discretize` on ``view_as_real`` pairs, in float64 whatever the input precision
    (O(channels H N) work; in complex64 the bilinear ``log`` of ``Abar ~ 1`` loses ~4 digits of
    ``w``, which the phase ``l w`` then multiplies by L). Returns complex128 ``(W, w)``."""
    A, C = (torch.view_as_complex(t.double()) for t in (A, C))
    return reference.discretize(dt.double(), A, C, discretization)


def _as_pairs(z: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.view_as_real(z).to(dtype).contiguous()


def _as_complex(pairs: Tensor) -> Tensor:
    """``(..., 2)`` real pairs as a complex tensor (float16/bfloat16 pairs widened to complex64)."""
    return torch.view_as_complex(pairs.to(compute_dtype(pairs.dtype)).contiguous())


@torch.library.custom_op("pyfast::ssm_s4d_kernel", mutates_args=())
def _s4d_kernel_op(dt: Tensor, A: Tensor, C: Tensor, L: int, discretization: str, backend: str) -> Tensor:
    W, w = _discretize_pairs(dt, A, C, discretization)
    acc = compute_dtype(dt.dtype)
    return _kernels(backend).vandermonde_fwd(_as_pairs(W, acc), _as_pairs(w, acc), L, dt.dtype)


@_s4d_kernel_op.register_fake
def _(dt, A, C, L, discretization, backend):
    return dt.new_empty((C.shape[0], C.shape[1], L))


def _discretize_backward(
    grad_W: Tensor, grad_w: Tensor, dt: Tensor, A: Tensor, C: Tensor, discretization: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """Chain rule through `reference.discretize` (complex128 ``A, C``; ``grad_W (channels, H, N)``,
    ``grad_w (H, N)`` in PyTorch's convention ``dL/dRe + i dL/dIm``). For holomorphic ``y = f(x)``
    that convention gives ``grad_x = conj(f'(x)) grad_y``; dt is real, so its gradient is the real
    part of the same sum."""
    step = dt.unsqueeze(-1)
    x = step * A  # dt A
    if discretization == "zoh":  # W = C (e^x - 1) / A,  w = x
        ex = torch.exp(x)
        dW_dC = (ex - 1) / A
        dW_dA = C * (step * ex * A - (ex - 1)) / A**2
        dW_ddt = C * ex
        dw_dx = torch.ones_like(x)
    else:  # W = C dt / (1 - x/2),  w = log(1 + x/2) - log(1 - x/2)
        d = 1 - x / 2
        dW_dC = step / d
        dW_dA = C * step * step / (2 * d**2)
        dW_ddt = C / d**2
        dw_dx = 1 / (1 - x**2 / 4)
    grad_C = dW_dC.conj() * grad_W
    grad_A = (dW_dA.conj() * grad_W).sum(0) + (step * dw_dx).conj() * grad_w
    grad_dt = (dW_ddt.conj() * grad_W).sum(0).real.sum(-1) + ((A * dw_dx).conj() * grad_w).real.sum(-1)
    return grad_dt, grad_A, grad_C


@torch.library.custom_op("pyfast::ssm_s4d_kernel_bwd", mutates_args=())
def _s4d_kernel_bwd_op(
    grad: Tensor, dt: Tensor, A: Tensor, C: Tensor, discretization: str, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    W, w = _discretize_pairs(dt, A, C, discretization)
    S0, S1 = _kernels(backend).vandermonde_bwd(grad.contiguous(), _as_pairs(w, compute_dtype(dt.dtype)))
    S0, S1 = (torch.view_as_complex(S.double()) for S in (S0, S1))
    # K = 2 Re(sum_n W exp(l w)):  dL/dW = 2 conj(S0),  dL/dw = 2 sum_c conj(W S1)  (csrc/cpu/ssm/ssm.h)
    grad_W = 2 * S0.conj()
    grad_w = 2 * (W * S1).conj().sum(0)
    A64, C64 = (torch.view_as_complex(t.double()) for t in (A, C))
    grad_dt, grad_A, grad_C = _discretize_backward(grad_W, grad_w, dt.double(), A64, C64, discretization)
    return grad_dt.to(dt.dtype), _as_pairs(grad_A, A.dtype), _as_pairs(grad_C, C.dtype)


@_s4d_kernel_bwd_op.register_fake
def _(grad, dt, A, C, discretization, backend):
    return torch.empty_like(dt), torch.empty_like(A), torch.empty_like(C)


def _s4d_kernel_setup(ctx, inputs, output):
    dt, A, C, _, discretization, backend = inputs
    ctx.save_for_backward(dt, A, C)
    ctx.discretization, ctx.backend = discretization, backend


def _s4d_kernel_backward(ctx, grad):
    dt, A, C = ctx.saved_tensors
    grad_dt, grad_A, grad_C = _s4d_kernel_bwd_op(grad, dt, A, C, ctx.discretization, ctx.backend)
    return grad_dt, grad_A, grad_C, None, None, None


_s4d_kernel_op.register_autograd(_s4d_kernel_backward, setup_context=_s4d_kernel_setup)


def s4d_kernel(dt: Tensor, A: Tensor, C: Tensor, L: int, *, discretization: str = "zoh") -> Tensor:
    """S4D convolution kernel ``K[c, h, l] = 2 Re(sum_n C'[c, h, n] Abar[h, n]^l)``, fused (no (H, N, L)
    temporary; memory O(channels H L)).

    Args:
        dt: ``(H,)`` float32/float64/float16/bfloat16 linear step sizes, > 0 (layers keep ``log_dt``
            and pass its exp). Its dtype is K's: float16/bfloat16 kernels compute in float32
            (complex64 A, C) and round K once.
        A: ``(H, N)`` complex (complex128 with float64 dt, complex64 otherwise), ``Re(A) < 0``:
            one eigenvalue of each conjugate pair.
        C: ``(channels, H, N)`` complex, same precision (B folded in).
        L: kernel length >= 1.
        discretization: ``"zoh"`` or ``"bilinear"`` (see `reference`).

    Returns:
        ``K (channels, H, L)`` in ``dt.dtype``; differentiable w.r.t. ``dt``, ``A`` and ``C``.
    """
    fn = "s4d_kernel"
    check_ssm_params(fn, dt, A, C)
    check_int(fn, "L", L, low=1, what="kernel length")
    check_choice(fn, "discretization", discretization, DISCRETIZATIONS)
    backend = backend_for("ssm.s4d_kernel", dt).backend
    if backend == "reference":
        return reference.s4d_kernel(dt, A, C, L, discretization=discretization)
    return _s4d_kernel_op(
        dt.contiguous(), torch.view_as_real(A.resolve_conj()).contiguous(),
        torch.view_as_real(C.resolve_conj()).contiguous(), L, discretization, backend,
    )


def s4d_kernel_real(dt: Tensor, A: Tensor, C: Tensor, L: int, *, discretization: str = "zoh") -> Tensor:
    """`s4d_kernel` with ``A (H, N, 2)`` and ``C (channels, H, N, 2)`` as real ``(re, im)`` pairs (the
    layout of ``torch.view_as_real``). Layers call this form: no complex tensor then enters a
    ``torch.compile`` graph, the complex arithmetic stays inside the custom op. The pairs may be
    float16/bfloat16 (computed in float32); their gradients come back in their dtype."""
    fn = "s4d_kernel_real"
    check_tensor(fn, "A", A, ndim=3, dims="(H, N, 2)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "C", C, ndim=4, dims="(channels, H, N, 2)", dtypes=FLOAT_DTYPES)
    for name, value in (("A", A), ("C", C)):
        if value.shape[-1] != 2:
            raise ValueError(f"{fn}: {name} must end in a (re, im) axis of size 2, got shape {tuple(value.shape)}")
    if torch.compiler.is_compiling():  # shape checks only; the complex views would enter the graph
        check_tensor(fn, "dt", dt, ndim=1, dims="(H,)", dtypes=(A.dtype,))
    else:
        check_ssm_params(fn, dt, _as_complex(A), _as_complex(C))
    check_int(fn, "L", L, low=1, what="kernel length")
    check_choice(fn, "discretization", discretization, DISCRETIZATIONS)
    backend = backend_for("ssm.s4d_kernel", dt).backend
    if backend == "reference":
        return reference.s4d_kernel(dt, _as_complex(A), _as_complex(C), L, discretization=discretization)
    return _s4d_kernel_op(dt.contiguous(), A.contiguous(), C.contiguous(), L, discretization, backend)


# --------------------------------------------------------------------------------------------------
# companion_kernel
# --------------------------------------------------------------------------------------------------


def companion_kernel(a: Tensor, b: Tensor, c: Tensor, L: int) -> Tensor:
    """SpaceTime companion SSM kernel ``K[h, l] = c_h^T A_h^l b_h`` with ``A_h`` the shift matrix plus
    last column ``a_h``, by the transfer-function FFT algorithm of `pyfast.ssm.companion` (no L
    matrix powers). Torch code on every device; differentiable by autograd.

    Args: ``a, b, c (H, d)`` float32/float64, the eigenvalues of each ``A_h`` inside the unit circle;
    ``L >= 1``. Returns ``K (H, L)`` in ``a.dtype``.
    """
    fn = "companion_kernel"
    for name, value in (("a", a), ("b", b), ("c", c)):
        check_tensor(fn, name, value, ndim=2, dims="(H, d)", dtypes=REAL_DTYPES)
    if not (a.shape == b.shape == c.shape) or not (a.dtype == b.dtype == c.dtype):
        raise ValueError(
            f"{fn}: a, b and c must share shape (H, d) and dtype, got {tuple(a.shape)} {a.dtype}, "
            f"{tuple(b.shape)} {b.dtype}, {tuple(c.shape)} {c.dtype}"
        )
    if a.shape[1] < 1:
        raise ValueError(f"{fn}: the state size d must be >= 1, got shape {tuple(a.shape)}")
    check_int(fn, "L", L, low=1, what="kernel length")
    check_same_device(fn, a=a, b=b, c=c)
    if _eager_value_checks():
        for name, value in (("a", a), ("b", b), ("c", c)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{fn}: {name} has non-finite values (NaN or Inf)")
        unstable = (~is_stable(a)).nonzero().flatten().tolist()
        if unstable:
            raise ValueError(
                f"{fn}: the companion matrices must be stable (all |eigenvalues| < 1), got "
                f"{len(unstable)} unstable row(s) of a, first {unstable[:5]}"
            )
    return companion_kernel_fft(a, b, c, L)


# --------------------------------------------------------------------------------------------------
# s4d_step
# --------------------------------------------------------------------------------------------------


def s4d_step(
    state: Tensor, u_t: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    *, discretization: str = "zoh",
) -> Tuple[Tensor, Tensor]:
    """One recurrent step for generation: ``x' = Abar x + Bbar u_t``, ``y = 2 Re(C x') + D u_t``.

    Args: ``state (batch, H, N)`` complex, ``u_t (batch, H)`` real, ``dt (H,)`` > 0, ``A, B, C (H, N)``
    complex (precision of dt), ``D (H,)`` or None. Returns ``(y (batch, H), new state)``. Stepping
    from a zero state equals ``fft_conv(u, s4d_kernel(dt, A, (B * C)[None], L)[0], D)``. Elementwise
    work per step: it runs the reference on every device.
    """
    fn = "s4d_step"
    for name, value in (("B", B), ("C", C)):
        check_tensor(fn, name, value, ndim=2, dims="(H, N)")
    check_ssm_params(fn, dt, A, C.unsqueeze(0))
    if B.shape != A.shape or B.dtype != A.dtype:
        raise ValueError(f"{fn}: B must match A {tuple(A.shape)} {A.dtype}, got {tuple(B.shape)} {B.dtype}")
    check_tensor(fn, "u_t", u_t, ndim=2, dims="(batch, H)", dtypes=FLOAT_DTYPES)
    check_tensor(fn, "state", state, ndim=3, dims="(batch, H, N)", dtypes=(A.dtype,))
    if state.shape != (u_t.shape[0], *A.shape):
        raise ValueError(f"{fn}: state must have shape (batch, H, N) = {(u_t.shape[0], *A.shape)}, got {tuple(state.shape)}")
    if u_t.shape[1] != A.shape[0]:
        raise ValueError(f"{fn}: u_t must have shape (batch, H) with H = {A.shape[0]}, got {tuple(u_t.shape)}")
    if D is not None and tuple(D.shape) != (A.shape[0],):
        raise ValueError(f"{fn}: D must have shape (H,) = ({A.shape[0]},), got {tuple(D.shape)}")
    check_choice(fn, "discretization", discretization, DISCRETIZATIONS)
    return reference.s4d_step(state, u_t, dt, A, B, C, D, discretization=discretization)


# --------------------------------------------------------------------------------------------------
# fft_conv
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pyfast::ssm_fft_conv", mutates_args=())
def _fft_conv_op(
    u: Tensor, k: Tensor, D: Optional[Tensor], pregate: Optional[Tensor], postgate: Optional[Tensor],
    bidirectional: bool, backend: str,
) -> Tensor:
    if backend == "triton" and _kernels(backend).fft_conv_supports(u.shape[-1], bidirectional):
        return _kernels(backend).fft_conv_fwd(u, k, D, pregate, postgate, bidirectional)
    return _fft_conv.fft_conv_fwd(u, k, D, pregate, postgate, bidirectional)


@_fft_conv_op.register_fake
def _(u, k, D, pregate, postgate, bidirectional, backend):
    return torch.empty_like(u)


@torch.library.custom_op("pyfast::ssm_fft_conv_bwd", mutates_args=())
def _fft_conv_bwd_op(
    grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], pregate: Optional[Tensor], postgate: Optional[Tensor],
    bidirectional: bool, backend: str,
) -> List[Tensor]:
    """Gradients w.r.t. ``u, k`` and each of ``D, pregate, postgate`` that is present, in that order.
    torch's FFT; on the Triton backend the fused kernel computes the correlation for grad u."""
    fused = None
    if backend == "triton" and _kernels(backend).fft_conv_supports(u.shape[-1], bidirectional):

        def fused(x: Tensor, gate: Optional[Tensor], correlate: bool = False) -> Tensor:
            return _kernels(backend).fft_conv_fwd(x, k, D, gate, None, bidirectional, correlate=correlate)

    grads = _fft_conv.fft_conv_bwd(grad, u, k, D, pregate, postgate, bidirectional, fused)
    return [g for g in grads if g is not None]


@_fft_conv_bwd_op.register_fake
def _(grad, u, k, D, pregate, postgate, bidirectional, backend):
    return [torch.empty_like(t) for t in (u, k, D, pregate, postgate) if t is not None]


def _fft_conv_setup(ctx, inputs, output):
    u, k, D, pregate, postgate, bidirectional, backend = inputs
    ctx.save_for_backward(u, k, D, pregate, postgate)
    ctx.bidirectional, ctx.backend = bidirectional, backend


def _fft_conv_backward(ctx, grad):
    saved = ctx.saved_tensors
    present = iter(_fft_conv_bwd_op(grad, *saved, ctx.bidirectional, ctx.backend))
    return (*(None if t is None else next(present) for t in saved), None, None)


_fft_conv_op.register_autograd(_fft_conv_backward, setup_context=_fft_conv_setup)


def fft_conv(
    u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, bidirectional: bool = False,
    pregate: Optional[Tensor] = None, postgate: Optional[Tensor] = None,
) -> Tensor:
    """Long convolution ``y = postgate * (v * k + D v)``, ``v = pregate * u``, any length.

    Args:
        u: ``(B, H, L)`` float32/float16/bfloat16/float64, ``1 <= L <= 2^20``.
        k: ``(H, L)`` causal kernel, or ``(2, H, L)`` with ``bidirectional=True`` (``k[1]`` holds the
            anti-causal lags -1, -2, ...: ``y[t] += sum_{s > t} k[1, s - t - 1] v[s]``).
        D: optional ``(H,)`` skip weights. pregate, postgate: optional ``(B, H, L)`` gates.

    Returns ``y (B, H, L)`` in ``u.dtype`` (computed in float32, float64 for float64 u);
    differentiable w.r.t. every tensor argument.
    """
    fn = "fft_conv"
    check_tensor(fn, "u", u, ndim=3, dims="(B, H, L)", dtypes=FLOAT_DTYPES)
    Bsz, H, L = u.shape
    check_int(fn, "L", L, low=1, high=MAX_LENGTH, what="u.shape[-1]")
    expected = (2, H, L) if bidirectional else (H, L)
    check_tensor(fn, "k", k, dtypes=FLOAT_DTYPES)
    if tuple(k.shape) != expected:
        form = "(2, H, L) for bidirectional=True" if bidirectional else "(H, L)"
        raise ValueError(f"{fn}: k must have shape {form} = {expected} to match u {tuple(u.shape)}, got {tuple(k.shape)}")
    if D is not None:
        check_tensor(fn, "D", D, dtypes=FLOAT_DTYPES)
        if tuple(D.shape) != (H,):
            raise ValueError(f"{fn}: D must have shape (H,) = ({H},), got {tuple(D.shape)}")
    for name, gate in (("pregate", pregate), ("postgate", postgate)):
        if gate is not None:
            check_tensor(fn, name, gate, dtypes=FLOAT_DTYPES)
            if gate.shape != u.shape:
                raise ValueError(f"{fn}: {name} must have the shape of u {tuple(u.shape)}, got {tuple(gate.shape)}")
    check_same_device(fn, u=u, k=k, D=D, pregate=pregate, postgate=postgate)
    if _eager_value_checks():
        for name, value in (("k", k), ("D", D)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{fn}: {name} has non-finite values (NaN or Inf)")
    backend = backend_for("ssm.fft_conv", u).backend
    if backend == "reference":
        return reference.fft_conv(u, k, D, bidirectional=bidirectional, pregate=pregate, postgate=postgate)
    return _fft_conv_op(u, k, D, pregate, postgate, bidirectional, backend)
