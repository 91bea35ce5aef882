"""Triton kernels of pyfast.ssm: the backend module that pyfast.ssm.ops calls for CUDA tensors."""
from .vandermonde import vandermonde_bwd, vandermonde_fwd

__all__ = ["vandermonde_fwd", "vandermonde_bwd"]
