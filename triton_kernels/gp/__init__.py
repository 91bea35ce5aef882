"""Triton kernels of pyfast.gp: the backend module that pyfast.gp.ops calls for CUDA tensors."""
from .mode_product import apply_mode

__all__ = ["apply_mode"]
