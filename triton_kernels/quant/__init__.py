"""Triton kernels of pyfast.quant: the backend module that pyfast.quant.ops calls for CUDA tensors.

Exports the kernel-backend contract (see pyfast/quant/ops.py): ``power_linear_fwd`` and
``dequantize``.
"""
from .power_linear import dequantize, power_linear_fwd

__all__ = ["dequantize", "power_linear_fwd"]
