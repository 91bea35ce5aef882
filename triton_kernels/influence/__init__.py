"""Triton kernels of pyfast.influence: the backend module that pyfast.influence.ops calls for CUDA
tensors (and CPU tensors under TRITON_INTERPRET=1)."""
from .covariance import covariance_sum
from .example_gradients import gradient_inner_products, gradient_squares, weighted_gradient_squares

__all__ = ["covariance_sum", "gradient_squares", "weighted_gradient_squares", "gradient_inner_products"]
