"""Triton kernels of pyfast.gp: the backend module that pyfast.gp.ops / pyfast.gp.kernels call
for CUDA tensors."""
from .mixture_kernel import mixture_kernel_fwd
from .mode_product import apply_mode
from .spectrum import log_spectrum_sum, scale_by_spectrum, spectrum_layout

__all__ = ["apply_mode", "log_spectrum_sum", "mixture_kernel_fwd", "scale_by_spectrum", "spectrum_layout"]
