"""`PowerQuantLinear` and `quantize_model`: nn.Linear layers stored as packed power-grid weights.

    report = pyfast.quant.quantize_model(model, bits=4, method="powerquant", group_size=128)
    print(report.table())                      # per-layer exponent and relative weight error
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .nupes import nupes_calibrate
from .ops import check_activation_quant, power_linear, power_quantize, search_activation_exponent, search_exponent
from .reference import DEFAULT_CLIPS, DEFAULT_EXPONENTS, QuantizedTensor

METHODS = ("uniform", "powerquant", "nupes")


class PowerQuantLinear(nn.Module):
    """``y = x W^T + b`` with W stored as a `QuantizedTensor` (buffers ``codes``, ``scales`` and, with
    per-group exponents, ``exponent_index``).

    Shapes: x ``(..., in_features)`` -> ``(..., out_features)``. The weight is frozen; the bias
    (if any) stays a trainable parameter. ``act_bits`` / ``act_exponent``: optional activation fake
    quantization of x (see `pyfast.quant.power_linear`). ``state_dict`` holds the packed codes and scales, so the
    module saves and loads (e.g. with safetensors) at its quantized size.
    """

    def __init__(self, q: QuantizedTensor, bias: Optional[Tensor] = None, *, act_bits: Optional[int] = None,
                 act_exponent: float = 1.0):
        super().__init__()
        if len(q.shape) != 2 or q.axis != 1:
            raise ValueError(f"PowerQuantLinear: q must be a (out_features, in_features) weight grouped along axis 1, got shape {q.shape} axis {q.axis}")
        check_activation_quant("PowerQuantLinear", act_bits, act_exponent)
        self.act_bits, self.act_exponent = act_bits, float(act_exponent)
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size, self.exponent, self.symmetric = q.bits, q.group_size, q.exponent, q.symmetric
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("exponent_index", q.exponent_index)  # None (not in state_dict) for one exponent
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, exponent: Union[float, Tensor], *, group_size: Optional[int] = 128,
                    clip=1.0, symmetric: bool = True, act_bits: Optional[int] = None,
                    act_exponent: float = 1.0) -> "PowerQuantLinear":
        q = power_quantize(linear.weight.detach(), bits, exponent, group_size=group_size, clip=clip, symmetric=symmetric)
        return cls(q, linear.bias, act_bits=act_bits, act_exponent=act_exponent)

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales, self.exponent, self.bits, self.group_size,
                               (self.out_features, self.in_features), 1, self.symmetric, self.exponent_index)

    def forward(self, x: Tensor) -> Tensor:
        y = power_linear(x, self.quantized, act_bits=self.act_bits, act_exponent=self.act_exponent)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        exponent = f"{len(self.exponent)} per-group values" if self.exponent_index is not None else f"{self.exponent:g}"
        act = "" if self.act_bits is None else f", act_bits={self.act_bits}, act_exponent={self.act_exponent:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, exponent={exponent}{act}, bias={self.bias is not None}")


@dataclass
class LayerReport:
    name: str
    shape: tuple
    exponent: float  # the mean over groups with per-group exponents
    weight_error: float  # ||W - Q(W)||^2 / ||W||^2


@dataclass
class QuantizationReport:
    method: str
    bits: int
    group_size: Optional[int]
    layers: List[LayerReport] = field(default_factory=list)

    @property
    def mean_weight_error(self) -> float:
        return sum(r.weight_error for r in self.layers) / max(len(self.layers), 1)

    def table(self) -> str:
        """Markdown table: one row per layer."""
        lines = ["| layer | shape | exponent | relative weight MSE |", "|---|---|---|---|"]
        lines += [f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.exponent:.2f} | {r.weight_error:.4f} |" for r in self.layers]
        return "\n".join(lines)


def _selected(name: str, include: Optional[Sequence[str]], exclude: Sequence[str]) -> bool:
    if include is not None and not any(fnmatch.fnmatch(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(name, p) for p in exclude)


def _capture_inputs(model: nn.Module, names: List[str], calib: Callable[[nn.Module], None], max_rows: int) -> Dict[str, Tensor]:
    """Runs ``calib(model)`` with hooks that keep the first ``max_rows`` input rows of each layer."""
    inputs: Dict[str, List[Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook(name):
        def keep(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            have = sum(t.shape[0] for t in inputs[name])
            if have < max_rows:
                inputs[name].append(rows[: max_rows - have].float())
        return keep

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            calib(model)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in inputs.items() if v}


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    method: str = "powerquant",
    *,
    group_size: Optional[int] = 128,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    calib: Optional[Callable[[nn.Module], None]] = None,
    calib_rows: int = 4096,
    exponents: Sequence[float] = DEFAULT_EXPONENTS,
    clips: Sequence[float] = DEFAULT_CLIPS,
    symmetric: bool = True,
    per_group_exponent: bool = False,
    act_bits: Optional[int] = None,
    act_exponent: Optional[float] = None,
    nupes_steps: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> QuantizationReport:
    """Replace the model's nn.Linear layers (in place) by `PowerQuantLinear`.

    Args:
        method: ``"uniform"`` (exponent 1, per-group clip searched), ``"powerquant"`` (exponent
            per layer searched jointly with the per-group clips, `search_exponent`) or ``"nupes"``
            (that search, then `nupes_calibrate` for ``nupes_steps`` Adam steps, seeded by ``seed``).
        group_size: elements per scale along the inputs; layers whose in_features it does not
            divide use one group per row.
        include / exclude: fnmatch patterns on module names (``include=None``: every Linear).
        calib: optional ``calib(model)`` running forward passes on calibration data; the searches
            then minimize each layer's output error on its captured inputs (first ``calib_rows`` rows).
        per_group_exponent: ``"powerquant"`` searches one exponent per group instead of per layer
            (`search_exponent(..., per_group=True)`).
        act_bits / act_exponent: activation fake quantization of every replaced layer (W4A8-style
            evaluation, `power_linear`); ``act_exponent=None`` searches it per layer on the captured
            calibration inputs (`search_activation_exponent`), or uses 1 without ``calib``.
        progress: a progress bar over the layers.

    Returns:
        `QuantizationReport` with each layer's exponent and relative weight error.
    """
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    check_activation_quant("quantize_model", act_bits, 1.0 if act_exponent is None else act_exponent)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and _selected(n, include, exclude)]
    captured = _capture_inputs(model, names, calib, calib_rows) if calib is not None else {}
    candidates = (1.0,) if method == "uniform" else tuple(exponents)
    report = QuantizationReport(method, bits, group_size)
    from rich.progress import track

    for name in track(names, description=f"quantize {method} W{bits}", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        w = linear.weight.detach()
        g = group_size if group_size is not None and w.shape[1] % group_size == 0 else None
        x = captured.get(name)
        if method == "nupes":
            q = nupes_calibrate(w, bits, x, group_size=g, steps=nupes_steps, seed=seed, symmetric=symmetric, progress=False).q
        else:
            found = search_exponent(w, bits, group_size=g, candidates=candidates, clips=clips, x=x,
                                    symmetric=symmetric, per_group=per_group_exponent and method == "powerquant")
            q = power_quantize(w, bits, found.exponent, group_size=g, clip=found.clip, symmetric=symmetric)
        a = act_exponent
        if act_bits is not None and a is None:
            a = 1.0 if x is None else search_activation_exponent(x, act_bits, candidates=exponents)
        layer = PowerQuantLinear(q, linear.bias, act_bits=act_bits, act_exponent=1.0 if a is None else a)
        w64 = w.double()
        q = layer.quantized
        err = ((q.dequantize(torch.float64) - w64).square().sum() / w64.square().sum()).item()
        report.layers.append(LayerReport(name, tuple(w.shape), float(q.group_exponents().mean()) if q.per_group else q.exponent, err))
        setattr(parent, child, layer.to(w.device))
    return report
