"""State-space model convolution: S4D / S4-PTD kernels, FFT long convolution, recurrent step.

    K = pyfast.ssm.s4d_kernel(dt, A, C, L)          # (channels, H, L) from diagonal complex A
"""
from . import reference
from .ops import s4d_kernel
from .reference import PTDInit, s4_ptd_init, s4d_inv_init, s4d_legs_init, s4d_lin_init, s4d_step

__all__ = [
    "PTDInit",
    "reference",
    "s4_ptd_init",
    "s4d_inv_init",
    "s4d_kernel",
    "s4d_legs_init",
    "s4d_lin_init",
    "s4d_step",
]
