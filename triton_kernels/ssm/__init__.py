"""Triton kernels of pyfast.ssm: the backend module that pyfast.ssm.ops calls for CUDA tensors."""
from .fft_conv import fft_conv_fwd, supports as fft_conv_supports
from .vandermonde import vandermonde_bwd, vandermonde_fwd

__all__ = ["fft_conv_fwd", "fft_conv_supports", "vandermonde_fwd", "vandermonde_bwd"]
