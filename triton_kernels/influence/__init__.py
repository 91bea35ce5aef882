"""Triton kernels of pyfast.influence: the backend module that pyfast.influence.ops calls for CUDA
tensors (and CPU tensors under TRITON_INTERPRET=1)."""
from .covariance import covariance_sum
from .rotated_gradients import rotated_gradient_squares

__all__ = ["covariance_sum", "rotated_gradient_squares"]
