"""Triton kernels of pyfast.moe: the backend module that pyfast.moe.ops calls for CUDA tensors.

Exports exactly the kernel-backend contract functions (see pyfast/moe/ops.py); each launcher
allocates its outputs, picks block sizes and launches the ``_<op>_*_kernel`` Triton kernels.
"""
from .expert_mlp import grouped_mm, grouped_mm_wgrad, moe_mlp_bwd, moe_mlp_fwd
from .aux_losses import load_balancing_loss_bwd, load_balancing_loss_fwd, router_z_loss_bwd, router_z_loss_fwd
from .route import route
from .rows import combine_rows, combine_weights_grad, gather_rows
from .topk_gating import topk_gating_bwd, topk_gating_fwd

__all__ = [
    "topk_gating_fwd",
    "topk_gating_bwd",
    "route",
    "gather_rows",
    "combine_rows",
    "combine_weights_grad",
    "load_balancing_loss_fwd",
    "load_balancing_loss_bwd",
    "router_z_loss_fwd",
    "router_z_loss_bwd",
    "grouped_mm",
    "grouped_mm_wgrad",
    "moe_mlp_fwd",
    "moe_mlp_bwd",
]
