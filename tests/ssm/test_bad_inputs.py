"""Clear errors on bad input: they name the function, the argument, the expectation and what came."""
import pytest
import torch

import pyfast
from ssm_inputs import ssm_params


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

