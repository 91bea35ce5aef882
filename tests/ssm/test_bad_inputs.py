"""Clear errors on bad input: they name the function, the argument, the expectation and what came."""
import pytest
import torch

import pyfast
from ssm_inputs import signal, ssm_params


def _good():
    return ssm_params(1, 3, 4, torch.float32)


@pytest.mark.parametrize("change,error,match", [
    (lambda dt, A, C: (dt, A.real.contiguous(), C), TypeError, r"s4d_kernel: A must be complex .*complex64.*got torch.float32"),
    (lambda dt, A, C: (dt, A, C.to(torch.complex128)), TypeError, r"s4d_kernel: C must be complex .*got torch.complex128"),
    (lambda dt, A, C: (dt.to(torch.complex64), A, C), TypeError, r"s4d_kernel: dt must have dtype in"),
    (lambda dt, A, C: (dt[:2], A, C), ValueError, r"s4d_kernel: .*must agree on H and N, got dt \(2,\)"),
    (lambda dt, A, C: (dt, A, C[..., :3]), ValueError, r"must agree on H and N"),
    (lambda dt, A, C: (dt, A[0], C), ValueError, r"s4d_kernel: A must be 2-D \(H, N\)"),
    (lambda dt, A, C: (-dt, A, C), ValueError, r"s4d_kernel: dt must be > 0 \(the linear step size"),
    (lambda dt, A, C: (dt, torch.complex(-A.real, A.imag), C), ValueError, r"Re\(A\) >= 0 is an unstable"),
    (lambda dt, A, C: (dt, A, C * float("nan")), ValueError, r"s4d_kernel: C has non-finite values"),
    (lambda dt, A, C: (dt * float("inf"), A, C), ValueError, r"s4d_kernel: dt has non-finite values"),
])
def test_s4d_kernel_bad_params(change, error, match):
    with pytest.raises(error, match=match):
        pyfast.ssm.s4d_kernel(*change(*_good()), 8)


def test_s4d_kernel_bad_length_and_method():
    with pytest.raises(ValueError, match=r"s4d_kernel: L must be in \[1, inf\] \(kernel length\), got 0"):
        pyfast.ssm.s4d_kernel(*_good(), 0)
    with pytest.raises(TypeError, match=r"s4d_kernel: L must be an int, got float"):
        pyfast.ssm.s4d_kernel(*_good(), 8.0)
    with pytest.raises(ValueError, match=r"discretization must be one of \('zoh', 'bilinear'\), got 'euler'"):
        pyfast.ssm.s4d_kernel(*_good(), 8, discretization="euler")


def test_s4d_step_equals_kernel_and_checks():
    dt, A, C = ssm_params(1, 3, 4, torch.float64)
    _, _, B = ssm_params(1, 3, 4, torch.float64, seed=5)
    B, C = B[0], C[0]
    D = signal(3, dtype=torch.float64)
    u = signal(2, 3, 12, dtype=torch.float64, seed=2)
    state = torch.zeros(2, 3, 4, dtype=A.dtype)
    ys = []
    for t in range(12):
        y, state = pyfast.ssm.s4d_step(state, u[..., t], dt, A, B, C, D)
        ys.append(y)
    K = pyfast.ssm.s4d_kernel(dt, A, (B * C)[None], 12)[0]
    torch.testing.assert_close(torch.stack(ys, -1), pyfast.ssm.fft_conv(u, K, D))
    with pytest.raises(ValueError, match=r"s4d_step: state must have shape \(batch, H, N\) = \(2, 3, 4\)"):
        pyfast.ssm.s4d_step(state[:1], u[..., 0], dt, A, B, C, D)
    with pytest.raises(ValueError, match=r"s4d_step: B must match A"):
        pyfast.ssm.s4d_step(state, u[..., 0], dt, A, B[:, :2], C, D)
    with pytest.raises(ValueError, match=r"s4d_step: dt must be > 0"):
        pyfast.ssm.s4d_step(state, u[..., 0], -dt, A, B, C, D)
