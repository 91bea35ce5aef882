"""State-space model convolution: S4D / S4-PTD kernels, FFT long convolution, recurrent step.

    K = pyfast.ssm.s4d_kernel(dt, A, C, L)          # (channels, H, L) from diagonal complex A
    y = pyfast.ssm.fft_conv(u, K[0], D)              # (B, H, L) causal long convolution + skip
    K = pyfast.ssm.companion_kernel(a, b, c, L)      # (H, L) SpaceTime companion-matrix kernel
"""
from . import nn, reference
from .ops import companion_kernel, fft_conv, s4d_kernel, s4d_kernel_real, s4d_step
from .reference import PTDInit, s4_ptd_init, s4d_inv_init, s4d_legs_init, s4d_lin_init

__all__ = [
    "PTDInit",
    "companion_kernel",
    "fft_conv",
    "nn",
    "reference",
    "s4_ptd_init",
    "s4d_inv_init",
    "s4d_kernel",
    "s4d_kernel_real",
    "s4d_legs_init",
    "s4d_lin_init",
    "s4d_step",
]
