"""The layers the `Analyzer` tracks, each seen as a linear map applied per token,
``y_t = W a_t (+ bias)`` with ``W (d_out, d_in)``:

- ``nn.Linear``: tokens are every position of the input ``(b, ..., d_in)``.
- Hugging Face ``Conv1D`` (GPT-2's layers, ``y = x @ weight + bias`` with ``weight (d_in, d_out)``):
  as nn.Linear; its gradient in this layout is ``weight.grad.T``.
- ``nn.Conv2d`` (groups = 1, zero padding): tokens are the image patches (`torch.nn.functional.unfold`),
  ``a_t (C_in kh kw)`` and ``s_t (C_out)`` per output pixel; ``W = weight.reshape(C_out, -1)``.

A bias becomes an input column of ones, so ``G = [dW | db]`` is ``(d_out, d_in + 1)``.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .reference import append_bias_column

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1, zero padding)"


def _is_hf_conv1d(module: nn.Module) -> bool:
    # A model holding a Conv1D has imported transformers; never import it here (seconds).
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def _conv_padding(module: nn.Conv2d) -> Union[Tuple[int, int], str]:
    """Explicit (symmetric) padding of a Conv2d, or why it has none."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in totals):
        return "nn.Conv2d with padding='same' and an even receptive field (asymmetric padding)"
    return tuple(t // 2 for t in totals)


def unsupported(module: nn.Module) -> Optional[str]:
    """None when `Analyzer` can track ``module``, else what it is."""
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped nn.Conv2d (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"nn.Conv2d with padding_mode={module.padding_mode!r}"
        padding = _conv_padding(module)
        return padding if isinstance(padding, str) else None
    return type(module).__name__


def is_default(module: nn.Module) -> bool:
    """Tracked when the caller names no modules."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or _is_hf_conv1d(module)


def dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_in, d_out)`` of the statistics, d_in counting the bias column."""
    weight = module.weight
    if isinstance(module, nn.Conv2d):
        d_in, d_out = weight[0].numel(), weight.shape[0]
    elif isinstance(module, nn.Linear):
        d_out, d_in = weight.shape
    else:
        d_in, d_out = weight.shape
    return d_in + (module.bias is not None), d_out


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as tokens ``a (b, T, d_in)``, with the bias column."""
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise ValueError(f"Analyzer: nn.Conv2d inputs must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
        patches = F.unfold(x, module.kernel_size, module.dilation, _conv_padding(module), module.stride)
        a = patches.transpose(1, 2)
    else:
        if x.dim() < 2:
            raise ValueError(f"Analyzer: tracked layers need batched inputs (examples, ..., d_in), got shape {tuple(x.shape)}")
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    return append_bias_column(a) if module.bias is not None else a


def output_gradients(module: nn.Module, g: Tensor) -> Tensor:
    """The gradient w.r.t. the layer's output as tokens ``s (b, T, d_out)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])
