"""Saving and loading quantized models with safetensors (needs the ``safetensors`` package).

The file holds the model's state dict (packed codes and scales of every `PowerQuantLinear`, with
per-group exponents their index, all other tensors as they are) and, in its metadata, each quantized
layer's grid (the exponent, or the list of distinct per-group exponents), so that
`load_quantized` can rebuild the layers inside a freshly constructed float model.
"""
from __future__ import annotations

import json
import os
from typing import Union

from torch import nn

from .nn import PowerQuantLinear
from .reference import QuantizedTensor

_KEY = "pyfast.quant.layers"


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model`` (after `quantize_model`) to a safetensors file at ``path``."""
    from safetensors.torch import save_file

    layers = {
        name: {"bits": m.bits, "group_size": m.group_size, "exponent": m.exponent, "symmetric": m.symmetric,
               "shape": [m.out_features, m.in_features], "act_bits": m.act_bits, "act_exponent": m.act_exponent}
        for name, m in model.named_modules() if isinstance(m, PowerQuantLinear)
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={_KEY: json.dumps(layers)})


def load_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Replace the layers of ``model`` (the float architecture) that were quantized in the file at
    ``path`` by `PowerQuantLinear`, then load every tensor (strict). Returns ``model``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _KEY not in metadata:
        raise ValueError(f"load_quantized: {path} holds no pyfast.quant layers (was it written by save_quantized?)")
    tensors = load_file(str(path))
    for name, spec in json.loads(metadata[_KEY]).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        exponent = tuple(spec["exponent"]) if isinstance(spec["exponent"], list) else spec["exponent"]
        q = QuantizedTensor(tensors[f"{name}.codes"], tensors[f"{name}.scales"], exponent, spec["bits"],
                            spec["group_size"], tuple(spec["shape"]), 1, spec["symmetric"], tensors.get(f"{name}.exponent_index"))
        bias = getattr(old, "bias", None)
        act = {"act_bits": spec.get("act_bits"), "act_exponent": spec.get("act_exponent", 1.0)}
        setattr(parent, child, PowerQuantLinear(q, bias, **act))
    model.load_state_dict(tensors, strict=True)
    return model
