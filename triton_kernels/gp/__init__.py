"""Triton kernels of pyfast.gp: the backend module that pyfast.gp.ops / pyfast.gp.kernels call
for CUDA tensors."""
from .mixture_kernel import mixture_kernel_fwd
from .mode_product import apply_mode

__all__ = ["apply_mode", "mixture_kernel_fwd"]
