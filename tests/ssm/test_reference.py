"""The reference against independent definitions: matrix powers, the O(L^2) sum, the recurrence."""
import pytest
import torch

from pyfast.ssm import reference
from ssm_inputs import signal, ssm_params


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("channels,H,N,L", [(1, 1, 1, 1), (2, 3, 4, 17), (1, 2, 5, 64)])
def test_vandermonde_equals_matrix_powers(discretization, channels, H, N, L):
    dt, A, C = ssm_params(channels, H, N)
    K = reference.s4d_kernel(dt, A, C, L, discretization=discretization)
    K_mp = reference.s4d_kernel_matrix_power(dt, A, C, L, discretization=discretization)
    torch.testing.assert_close(K, K_mp, rtol=1e-9, atol=1e-9 * K_mp.abs().max().item())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("L", [1, 3, 16, 37])
def test_fft_conv_equals_direct_sum(bidirectional, L):
    B, H = 2, 3
    u = signal(B, H, L, dtype=torch.float64)
    k = signal(*((2, H, L) if bidirectional else (H, L)), dtype=torch.float64, seed=2)
    D = signal(H, dtype=torch.float64, seed=3)
    pre, post = signal(B, H, L, dtype=torch.float64, seed=4), signal(B, H, L, dtype=torch.float64, seed=5)
    kw = dict(bidirectional=bidirectional, pregate=pre, postgate=post)
    torch.testing.assert_close(reference.fft_conv(u, k, D, **kw), reference.fft_conv_direct(u, k, D, **kw))


def test_fft_conv_direct_by_loops():
    """The Toeplitz construction against literal loops over t and s."""
    u, k = signal(1, 2, 6, dtype=torch.float64), signal(2, 2, 6, dtype=torch.float64, seed=2)
    y = torch.zeros(1, 2, 6, dtype=torch.float64)
    for h in range(2):
        for t in range(6):
            for s in range(6):
                y[0, h, t] += u[0, h, s] * (k[0, h, t - s] if s <= t else k[1, h, s - t - 1])
    torch.testing.assert_close(reference.fft_conv_direct(u, k, bidirectional=True), y)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_step_equals_convolution(discretization):
    Bsz, H, N, L = 2, 3, 4, 20
    dt, A, C = ssm_params(1, H, N)
    _, _, Bm = ssm_params(1, H, N, seed=7)
    Bm = Bm[0]
    D = signal(H, dtype=torch.float64, seed=3)
    u = signal(Bsz, H, L, dtype=torch.float64)
    K = reference.s4d_kernel(dt, A, C * Bm, L, discretization=discretization)[0]
    y_conv = reference.fft_conv(u, K, D)
    state = torch.zeros(Bsz, H, N, dtype=A.dtype)
    ys = []
    for t in range(L):
        y, state = reference.s4d_step(state, u[..., t], dt, A, Bm, C[0], D, discretization=discretization)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, -1), y_conv)


@pytest.mark.parametrize("init", [reference.s4d_lin_init, reference.s4d_inv_init, reference.s4d_legs_init])
def test_diagonal_inits(init):
    A = init(3, 8)
    assert A.shape == (3, 8) and A.is_complex()
    assert torch.all(A.real < 0)
    assert torch.equal(A[0], A[2])
    assert A[0].imag.unique().numel() == 8  # distinct frequencies


def test_legs_init_matches_normal_part_spectrum():
    """S4D-LegS eigenvalues have real part -1/2 (normal part of HiPPO-LegS is -I/2 + skew)."""
    A = reference.s4d_legs_init(1, 16, dtype=torch.complex128)
    torch.testing.assert_close(A.real, torch.full_like(A.real, -0.5))


def test_ptd_conditions_eigenvectors():
    init = reference.s4_ptd_init(2, 16, perturbation=1e-2)
    assert init.A.shape == init.B.shape == (2, 16)
    assert torch.all(init.A.real < 0)
    # Unperturbed HiPPO-LegS (2N = 32) has an eigenvector condition number far beyond 1e12.
    assert 1 <= init.condition_number < 1e5
    weaker = reference.s4_ptd_init(1, 16, perturbation=1e-4)
    assert weaker.condition_number > init.condition_number
    with pytest.raises(ValueError, match="perturbation"):
        reference.s4_ptd_init(1, 4, perturbation=0.0)
