"""`patch_hf`: run the expert MLPs of Hugging Face MoE models on `pyfast.moe.moe_mlp`.

Hugging Face transformers (>= 5) stores the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3 and
many others as one ``*Experts`` module with ``gate_up_proj (E, 2 * ffn, d)`` (gate rows first) and
``down_proj (E, d, ffn)``, called as ``experts(hidden (T, d), top_k_index (T, k), top_k_weights (T, k))``
after the model's own router. That is exactly `moe_mlp`'s layout, so the patch keeps the model's
router, shared experts and parameters, and replaces only the loop over experts.
"""
from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from .experts import moe_mlp

# Hugging Face ``hidden_act`` -> gated activation of `moe_mlp` (HF "gelu" is the exact erf form).
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _activation_of(experts: nn.Module):
    """The `moe_mlp` activation of an HF experts module, or None when its layout differs
    (biases, transposed or interleaved weights, custom gating, post-expert norms)."""
    config = getattr(experts, "config", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if config is None or not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    standard = (
        getattr(experts, "has_gate", False)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "has_post_expert_norm", True)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[1] == 2 * down.shape[2]
    )
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    if not standard or getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        return None
    return _GATED.get(getattr(config, "hidden_act", None))


def _pyfast_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    return moe_mlp(
        hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
        activation=self._pyfast_activation,
    )


def patch_hf(model: nn.Module) -> int:
    """Swap the expert loops of a Hugging Face MoE model for `pyfast.moe.moe_mlp`, in place.

    Patches every experts module in the standard layout (see module docstring); the outputs are
    those of the original model up to float rounding. Returns the number of patched modules
    (0 when the model has none, e.g. an older transformers whose experts are ``nn.ModuleList``s).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_hf: model must be a torch.nn.Module, got {type(model).__name__}")
    patched = 0
    for module in model.modules():
        activation = _activation_of(module)
        if activation is None:
            continue
        module._pyfast_activation = activation
        module.forward = types.MethodType(_pyfast_experts_forward, module)
        patched += 1
    return patched
