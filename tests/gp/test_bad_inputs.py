"""Bad input: errors name the function, the argument, the expectation and what came."""
import pytest
import torch

from pyfast.gp import kron_mv, mode_product


def test_kron_mv_bad_inputs():
    K = torch.randn(3, 3)
    with pytest.raises(TypeError, match="kron_mv: factors must be a non-empty list"):
        kron_mv(K, torch.randn(3))
    with pytest.raises(TypeError, match="kron_mv: factors must be a non-empty list"):
        kron_mv([], torch.randn(3))
    with pytest.raises(ValueError, match=r"kron_mv: factors\[1\] must be 2-D"):
        kron_mv([K, torch.randn(3)], torch.randn(9))
    with pytest.raises(TypeError, match=r"kron_mv: factors\[0\] has dtype torch.float64"):
        kron_mv([K.double()], torch.randn(3))
    with pytest.raises(ValueError, match=r"kron_mv: v must have shape \(9,\) or \(9, B\)"):
        kron_mv([K, K], torch.randn(8))
    with pytest.raises(ValueError, match=r"kron_mv: v must have shape"):
        kron_mv([K], torch.randn(3, 2, 2))
    with pytest.raises(TypeError, match="kron_mv: v must be a torch.Tensor"):
        kron_mv([K], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="kron_mv: v must have dtype"):
        kron_mv([K.int()], torch.ones(3, dtype=torch.int32))


def test_mode_product_bad_inputs():
    M = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"mode_product: mode must be an int in \[0, 2\)"):
        mode_product(M, torch.randn(6), [3, 2], 2)
    with pytest.raises(ValueError, match=r"mode_product: matrix must have 2 columns \(grid\[1\]\)"):
        mode_product(M, torch.randn(6), [3, 2], 1)
    with pytest.raises(ValueError, match=r"mode_product: grid\[0\] must be a non-negative int"):
        mode_product(M, torch.randn(6), [-3, 2], 0)
    with pytest.raises(ValueError, match=r"mode_product: v must have shape \(6,\)"):
        mode_product(M, torch.randn(7), [3, 2], 0)
