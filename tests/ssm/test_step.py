"""pyfast.ssm.s4d_step: the recurrent mode equals the convolution mode; its argument checks."""
import pytest
import torch

import pyfast
from ssm_inputs import signal, ssm_params


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
