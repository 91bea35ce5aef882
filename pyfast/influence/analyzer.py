"""`Analyzer`: EK-FAC influence of training examples on queries for the nn.Linear layers of a model.

    analyzer = Analyzer(model)                                  # every nn.Linear (or name some)
    analyzer.fit_factors(train_loader, train_loss)              # covariance -> eigen -> Lambda
    analyzer.save_factors("factors.safetensors")
    scores = analyzer.pairwise_scores(query_loader, measurement, train_loader, train_loss)  # (Q, N)
    self_influence = analyzer.self_scores(train_loader, train_loss)                          # (N,)

``train_loss(model, batch)`` and ``measurement(model, batch)`` return either a scalar or
``(scalar, mask)``; the scalar is the loss summed over the batch's examples (kronfluence's
convention: sum, not mean; pass a loss on labels sampled from the model for the true Fisher),
``mask (b, T)`` marks the tokens that count. Tracked layers see inputs ``(b, d_in)`` or
``(b, T, d_in)``; a bias becomes an input column of ones.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from rich.progress import track
from torch import Tensor, nn

from . import ops, reference
from .factors import EKFACFactors

LossFn = Callable[[nn.Module, object], Union[Tensor, Tuple[Tensor, Optional[Tensor]]]]


class _Tap:
    """Forward hook on one nn.Linear: keeps its input (with the bias column) and, through a hook
    on its output, the gradient of the loss w.r.t. that output."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.a: Optional[Tensor] = None
        self.s: Optional[Tensor] = None
        self._handle = module.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()
        self.a = reference.append_bias_column(x) if module.bias is not None else x
        output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        self.s = grad.detach()

    def take(self) -> Tuple[Tensor, Tensor]:
        """``(a, s)`` of the last forward/backward as ``(b, T, d)`` (T = 1 for 2-D inputs)."""
        if self.a is None or self.s is None:
            raise RuntimeError("Analyzer: a tracked layer saw no forward and backward pass for this batch")
        a, s = self.a, self.s
        self.a = self.s = None
        if a.dim() == 2:
            a, s = a.unsqueeze(1), s.unsqueeze(1)
        return a.reshape(a.shape[0], -1, a.shape[-1]), s.reshape(s.shape[0], -1, s.shape[-1])

    def remove(self) -> None:
        self._handle.remove()


def _loss_and_mask(fn_name: str, out) -> Tuple[Tensor, Optional[Tensor]]:
    loss, mask = out if isinstance(out, tuple) else (out, None)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"Analyzer: {fn_name} must return a scalar tensor (or (scalar, mask)), got {type(loss).__name__}")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"Analyzer: {fn_name} returned a non-finite loss ({float(loss.detach())})")
    return loss, mask


class Analyzer:
    """EK-FAC influence analysis of ``model``'s tracked nn.Linear layers.

    Args:
        model: the model; it stays in the caller's mode (call ``model.eval()`` first where needed).
        modules: names of the layers to track (``model.named_modules()``); default every nn.Linear.
        damping: > 0, or None for 0.1 x mean(Lambda) per layer.
        progress: show progress bars over the data loaders.
    """

    def __init__(self, model: nn.Module, modules: Optional[Sequence[str]] = None, *, damping: Optional[float] = None, progress: bool = True):
        named = dict(model.named_modules())
        if modules is None:
            modules = [name for name, m in named.items() if isinstance(m, nn.Linear)]
            if not modules:
                raise ValueError("Analyzer: model has no nn.Linear layer to track")
        unknown = [name for name in modules if name not in named]
        if unknown:
            raise ValueError(f"Analyzer: modules {unknown} are not in the model")
        unsupported = [f"{name} ({type(named[name]).__name__})" for name in modules if not isinstance(named[name], nn.Linear)]
        if unsupported:
            raise ValueError(f"Analyzer: only nn.Linear layers are supported, got {', '.join(unsupported)}")
        if damping is not None and not damping > 0:
            raise ValueError(f"Analyzer: damping must be > 0 or None, got {damping}")
        self.model = model
        self.names: List[str] = list(modules)
        self.damping = damping
        self.progress = progress
        self.factors: Dict[str, EKFACFactors] = {}

    # ---------------------------------------------------------------------------------------------
    def _passes(self, loader: Iterable, loss_fn: LossFn, fn_name: str, what: str):
        """Per batch: ``{name: (a, s)}`` and the batch's mask, after one forward and backward."""
        modules = dict(self.model.named_modules())
        taps = {name: _Tap(modules[name]) for name in self.names}
        seen = False
        try:
            for batch in track(loader, description=what, disable=not self.progress):
                seen = True
                self.model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss, mask = _loss_and_mask(fn_name, loss_fn(self.model, batch))
                    loss.backward()
                stats = {name: tap.take() for name, tap in taps.items()}
                if mask is not None:
                    shape = next(iter(stats.values()))[0].shape[:2]
                    if tuple(mask.shape) != tuple(shape):
                        raise ValueError(f"Analyzer: {fn_name}'s mask must have shape {tuple(shape)} (examples, tokens), got {tuple(mask.shape)}")
                yield stats, mask
        finally:
            for tap in taps.values():
                tap.remove()
            self.model.zero_grad(set_to_none=True)
        if not seen:
            raise ValueError(f"Analyzer: the data loader for {what} yielded no batch")

    def fit_factors(self, loader: Iterable, loss_fn: LossFn) -> Dict[str, EKFACFactors]:
        """Fit A, S (token means), their float64 eigenbases and Lambda (example mean) per layer,
        in two passes over ``loader``."""
        sums: Dict[str, List] = {}
        for stats, mask in self._passes(loader, loss_fn, "train_loss", "covariance"):
            count = float(mask.sum()) if mask is not None else None
            for name, (a, s) in stats.items():
                n = count if count is not None else a.shape[0] * a.shape[1]
                A, S = ops.covariance(a, mask) * n, ops.covariance(s, mask) * n
                if name in sums:
                    sums[name][0] += A
                    sums[name][1] += S
                    sums[name][2] += n
                else:
                    sums[name] = [A.double(), S.double(), n]
        eigen = {name: ops.eigen_factors(A / n, S / n, name=name) for name, (A, S, n) in sums.items()}
        lam: Dict[str, List] = {}
        for stats, mask in self._passes(loader, loss_fn, "train_loss", "eigenvalue correction"):
            for name, (a, s) in stats.items():
                e = eigen[name]
                part = ops.lambda_correction(a, s, e.Q_A, e.Q_S, mask).double() * a.shape[0]
                if name in lam:
                    lam[name][0] += part
                    lam[name][1] += a.shape[0]
                else:
                    lam[name] = [part, a.shape[0]]
        self.factors = {
            name: EKFACFactors(eigen[name].Q_A, eigen[name].Q_S, total / count) for name, (total, count) in lam.items()
        }
        return self.factors

    def _require_factors(self) -> None:
        if not self.factors:
            raise RuntimeError("Analyzer: no factors; call fit_factors or load_factors first")

    def _damping(self, name: str) -> float:
        return self.damping if self.damping is not None else reference.default_damping(self.factors[name].Lambda)

    # ---------------------------------------------------------------------------------------------
    def query_gradients(self, loader: Iterable, measurement: LossFn, *, rank: Optional[int] = None):
        """Preconditioned query gradients per layer: ``{name: (Q, d_out, d_in)}`` or `LowRankQuery`."""
        self._require_factors()
        grads: Dict[str, List[Tensor]] = {name: [] for name in self.names}
        for stats, mask in self._passes(loader, measurement, "measurement", "query gradients"):
            for name, (a, s) in stats.items():
                a = a if mask is None else a * mask.to(a.dtype).unsqueeze(-1)
                grads[name].append(torch.einsum("bto,bti->boi", s, a))
        out = {}
        for name, parts in grads.items():
            out[name] = ops.precondition(torch.cat(parts), self.factors[name], damping=self._damping(name), rank=rank)
        return out

    def pairwise_scores(
        self,
        query_loader: Iterable,
        measurement: LossFn,
        train_loader: Iterable,
        loss_fn: LossFn,
        *,
        rank: Optional[int] = None,
        per_layer: bool = False,
    ) -> Union[Tensor, Dict[str, Tensor]]:
        """Influence of every training example on every query, ``(Q, N)`` summed over layers (or a
        dict of per-layer scores). ``rank`` compresses the preconditioned query gradients."""
        queries = self.query_gradients(query_loader, measurement, rank=rank)
        chunks: Dict[str, List[Tensor]] = {name: [] for name in self.names}
        for stats, mask in self._passes(train_loader, loss_fn, "train_loss", "pairwise scores"):
            for name, (a, s) in stats.items():
                chunks[name].append(ops.pairwise_scores(queries[name], a, s, mask=mask))
        scores = {name: torch.cat(parts, dim=1) for name, parts in chunks.items()}
        return scores if per_layer else sum(scores.values())

    def self_scores(self, loader: Iterable, loss_fn: LossFn, *, per_layer: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        """Self-influence ``<H^-1 g_n, g_n>`` of every training example, ``(N,)`` summed over layers."""
        self._require_factors()
        chunks: Dict[str, List[Tensor]] = {name: [] for name in self.names}
        for stats, mask in self._passes(loader, loss_fn, "train_loss", "self scores"):
            for name, (a, s) in stats.items():
                factors = self.factors[name]
                chunks[name].append(ops.self_scores(a, s, factors, damping=self._damping(name), mask=mask))
        scores = {name: torch.cat(parts) for name, parts in chunks.items()}
        return scores if per_layer else sum(scores.values())

    # ---------------------------------------------------------------------------------------------
    def save_factors(self, path: str) -> None:
        """Write the fitted factors to a safetensors file (keys ``<layer>/Q_A|Q_S|Lambda``)."""
        from safetensors.torch import save_file

        self._require_factors()
        tensors = {f"{name}/{field}": t.contiguous().cpu() for name, f in self.factors.items() for field, t in f._asdict().items()}
        save_file(tensors, path)

    def load_factors(self, path: str) -> Dict[str, EKFACFactors]:
        """Read factors written by `save_factors`; every tracked layer must be present."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        missing = [name for name in self.names if f"{name}/Lambda" not in tensors]
        if missing:
            raise ValueError(f"Analyzer.load_factors: {path} has no factors for layers {missing}")
        self.factors = {name: EKFACFactors(*(tensors[f"{name}/{field}"] for field in EKFACFactors._fields)) for name in self.names}
        return self.factors
