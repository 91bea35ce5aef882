"""`Analyzer`: EK-FAC influence of training examples on queries for the linear layers of a model
(nn.Linear, Hugging Face Conv1D, nn.Conv2d by unfolding; see `layers`).

    analyzer = Analyzer(model, batch_size=32)                    # every supported layer (or name some)
    analyzer.fit_factors(train_set, train_loss)                 # covariance -> eigen -> Lambda
    analyzer.save_factors("factors.safetensors")
    scores = analyzer.pairwise_scores(query_set, measurement, train_set, train_loss)   # (Q, N)
    self_influence = analyzer.self_scores(train_set, train_loss)                       # (N,)

Data is a map-style ``torch.utils.data.Dataset`` (batched by the Analyzer: per-stage batch sizes,
``train_indices`` subsets, sharding over ranks) or any iterable of ready batches (used as given).
``train_loss(model, batch)`` and ``measurement(model, batch)`` return either a scalar or
``(scalar, mask)``; the scalar is the loss summed over the batch's examples (kronfluence's
convention: sum, not mean; pass a loss on labels sampled from the model for the true Fisher),
``mask (b, T)`` marks the tokens that count in every tracked layer.

Only the gradients w.r.t. the tracked layers' outputs are computed (`torch.autograd.grad` on their
graph edges): no parameter gradients, no ``.grad`` written.

With ``torch.distributed`` initialized, every rank passes the same data and takes every
``world``-th batch: covariance and Lambda sums are all-reduced with their token and example counts,
training-set scores are gathered back into the data's order (queries are computed on every rank).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from rich.progress import track
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._checks import check_int
from . import _distributed, _torch, layers, ops, reference
from .factors import EKFACFactors

LossFn = Callable[[nn.Module, object], Union[Tensor, Tuple[Tensor, Optional[Tensor]]]]
Data = Union[Dataset, Iterable]
Stats = Dict[str, Tuple[Tensor, Tensor]]


class _Taps:
    """Forward hooks on the tracked layers for one batch: each call's input tokens and the graph
    edge of its output (taken before any in-place op on the output can move it)."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.calls: Dict[str, list] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(functools.partial(self._forward, name)) for name, m in modules.items()]

    def __enter__(self) -> "_Taps":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _forward(self, name: str, module: nn.Module, inputs, output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if not output.requires_grad:
            raise ValueError(f"Analyzer: the output of layer {name!r} does not require grad (frozen parameters and inputs?)")
        a = layers.layer_inputs(module, inputs[0].detach())
        self.calls[name].append((a, get_gradient_edge(output), output))

    def collect(self, loss: Tensor, fn_name: str) -> Stats:
        """``{name: (a (b, T, d_in), s (b, T, d_out))}``; a layer called several times per forward has
        its calls' tokens concatenated (their gradients add up)."""
        silent = [name for name, calls in self.calls.items() if not calls]
        if silent:
            raise ValueError(f"Analyzer: tracked layers {silent} saw no forward pass with gradients in {fn_name}")
        if loss.grad_fn is None:
            raise ValueError(f"Analyzer: {fn_name}'s loss does not depend on the tracked layers (it has no grad_fn)")
        calls = [(name, call) for name, layer_calls in self.calls.items() for call in layer_calls]
        grads = torch.autograd.grad(loss, [edge for _, (_, edge, _) in calls], allow_unused=True)
        stats: Dict[str, Tuple[List[Tensor], List[Tensor]]] = {name: ([], []) for name in self.calls}
        for (name, (a, _, output)), g in zip(calls, grads):
            g = torch.zeros_like(output) if g is None else g
            stats[name][0].append(a)
            stats[name][1].append(layers.output_gradients(self.modules[name], g.detach()))
        return {name: (_join(a_parts), _join(s_parts)) for name, (a_parts, s_parts) in stats.items()}


def _join(parts: List[Tensor]) -> Tensor:
    """The tokens of a layer's calls as one ``(b, T, d)`` tensor (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _loss_and_mask(fn_name: str, out) -> Tuple[Tensor, Optional[Tensor]]:
    loss, mask = out if isinstance(out, tuple) else (out, None)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"Analyzer: {fn_name} must return a scalar tensor (or (scalar, mask)), got {type(loss).__name__}")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"Analyzer: {fn_name} returned a non-finite loss ({float(loss.detach())})")
    return loss, mask


@contextlib.contextmanager
def _layer_named(name: str):
    """Name the layer in the errors of the ops (e.g. non-finite statistics)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"Analyzer: layer {name!r}: {err}") from err


def _is_dataset(data) -> bool:
    if isinstance(data, IterableDataset):
        raise TypeError("Analyzer: an IterableDataset cannot be batched by index; pass a DataLoader over it")
    return isinstance(data, Dataset)


class Analyzer:
    """EK-FAC influence analysis of ``model``'s tracked layers.

    Args:
        model: the model; it stays in the caller's mode (call ``model.eval()`` first where needed).
        modules: names of the layers to track (``model.named_modules()``); default every nn.Linear,
            Hugging Face Conv1D and nn.Conv2d.
        damping: > 0, or None for 0.1 x mean(Lambda) per layer.
        batch_size: examples per batch when data is a Dataset (each stage can override it).
        collate_fn: how a Dataset's examples become a batch (default: torch's default collate).
        chunk_bytes: memory bound of the per-example gradient chunks of the CPU ops (default 64 MiB).
        score_dtype: dtype of the layer statistics when scoring (e.g. torch.float32 for a float64
            model, or torch.bfloat16); default: as the model computes them.
        offload_factors: keep the fitted factors on the CPU and copy them to the compute device
            for each stage.
        process_group: the data-parallel group (default: the default group when initialized).
        progress: show progress bars (on rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Optional[Sequence[str]] = None,
        *,
        damping: Optional[float] = None,
        batch_size: int = 16,
        collate_fn: Optional[Callable] = None,
        chunk_bytes: Optional[int] = None,
        score_dtype: Optional[torch.dtype] = None,
        offload_factors: bool = False,
        process_group: Optional[object] = None,
        progress: bool = True,
    ):
        named = dict(model.named_modules())
        if modules is None:
            modules = [name for name, m in named.items() if layers.is_default(m)]
            if not modules:
                raise ValueError(f"Analyzer: model has no layer to track ({layers.SUPPORTED})")
        unknown = [name for name in modules if name not in named]
        if unknown:
            raise ValueError(f"Analyzer: modules {unknown} are not in the model")
        unsupported = [f"{name} ({why})" for name in modules if (why := layers.unsupported(named[name])) is not None]
        if unsupported:
            raise ValueError(
                f"Analyzer: unsupported layers {', '.join(unsupported)}; supported: {layers.SUPPORTED} "
                "(pass `modules` to track a subset)"
            )
        if damping is not None and (isinstance(damping, bool) or not isinstance(damping, (int, float))):
            raise TypeError(f"Analyzer: damping must be a float or None, got {type(damping).__name__}")
        if damping is not None and not damping > 0:
            raise ValueError(f"Analyzer: damping must be > 0 or None, got {damping}")
        check_int("Analyzer", "batch_size", batch_size, low=1)
        if chunk_bytes is not None:
            check_int("Analyzer", "chunk_bytes", chunk_bytes, low=1)
        if score_dtype is not None and not (isinstance(score_dtype, torch.dtype) and score_dtype.is_floating_point):
            raise TypeError(f"Analyzer: score_dtype must be a floating torch.dtype or None, got {score_dtype}")
        self.model = model
        self.names: List[str] = list(modules)
        self.damping = damping
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.chunk_bytes = chunk_bytes
        self.score_dtype = score_dtype
        self.offload_factors = offload_factors
        self.process_group = process_group
        self.progress = progress
        self.factors: Dict[str, EKFACFactors] = {}

    # ---------------------------------------------------------------------------------------------
    # batches and passes
    # ---------------------------------------------------------------------------------------------
    def _batches(self, data: Data, batch_size: Optional[int], indices, shard: bool, what: str) -> Tuple[Iterator, Optional[int]]:
        """This rank's ``(global batch index, batch)`` pairs and their number (None if unknown)."""
        rank, world = _distributed.rank_and_world(self.process_group) if shard else (0, 1)
        if _is_dataset(data):
            size = self.batch_size if batch_size is None else batch_size
            check_int(f"Analyzer ({what})", "batch_size", size, low=1)
            order = _subset(data, indices, what)
            index_batches = [order[i : i + size] for i in range(0, len(order), size)]
            mine = [(k, b) for k, b in enumerate(index_batches) if k % world == rank]
            loader = DataLoader(data, batch_sampler=[b for _, b in mine], collate_fn=self.collate_fn)
            return zip([k for k, _ in mine], loader), len(mine)
        if indices is not None:
            raise TypeError(f"Analyzer ({what}): train_indices needs a map-style torch.utils.data.Dataset, got {type(data).__name__}")
        if batch_size is not None:
            raise TypeError(f"Analyzer ({what}): batch sizes apply to a Dataset; {type(data).__name__} yields ready batches")
        total = math.ceil((len(data) - rank) / world) if hasattr(data, "__len__") else None

        def mine():
            empty = True
            for k, batch in enumerate(data):
                empty = False
                if k % world == rank:
                    yield k, batch
            if empty:
                raise ValueError(f"Analyzer: the data for {what} yielded no batch")

        return mine(), total

    def _passes(
        self,
        data: Data,
        loss_fn: LossFn,
        fn_name: str,
        what: str,
        *,
        batch_size: Optional[int] = None,
        indices=None,
        shard: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> Iterator[Tuple[int, Stats, Optional[Tensor]]]:
        """Per batch of this rank: ``(batch index, {name: (a, s)}, mask)`` after one forward and a
        backward to the tracked layers' outputs."""
        batches, total = self._batches(data, batch_size, indices, shard, what)
        modules = dict(self.model.named_modules())
        modules = {name: modules[name] for name in self.names}
        for k, batch in track(batches, description=what, total=total, disable=not self._show_progress()):
            with torch.enable_grad(), _Taps(modules) as taps:
                loss, mask = _loss_and_mask(fn_name, loss_fn(self.model, batch))
                stats = taps.collect(loss, fn_name)
            for name, (a, _) in stats.items():
                if mask is not None and tuple(mask.shape) != tuple(a.shape[:2]):
                    raise ValueError(
                        f"Analyzer: {fn_name}'s mask must have shape {tuple(a.shape[:2])} (examples, tokens) "
                        f"of layer {name!r}, got {tuple(mask.shape)}"
                    )
            if dtype is not None:
                stats = {name: (a.to(dtype), s.to(dtype)) for name, (a, s) in stats.items()}
            yield k, stats, mask

    def _chunk_budget(self):
        return _torch.chunk_bytes(self.chunk_bytes)

    # ---------------------------------------------------------------------------------------------
    # fitting
    # ---------------------------------------------------------------------------------------------
    def _zeros(self, name: str, *shape: int) -> Tensor:
        weight = dict(self.model.named_modules())[name].weight
        return torch.zeros(shape, dtype=torch.float64, device=weight.device)

    def fit_factors(
        self, data: Data, loss_fn: LossFn, *, covariance_batch_size: Optional[int] = None, lambda_batch_size: Optional[int] = None
    ) -> Dict[str, EKFACFactors]:
        """Fit A, S (means over unmasked tokens), their float64 eigenbases and Lambda (mean over
        examples) per layer, in two passes over ``data`` (sums all-reduced over ranks)."""
        _require_data(data, "fit_factors")
        modules = dict(self.model.named_modules())
        dims = {name: layers.dims(modules[name]) for name in self.names}
        cov = {name: (self._zeros(name, d_in, d_in), self._zeros(name, d_out, d_out), self._zeros(name)) for name, (d_in, d_out) in dims.items()}
        with self._chunk_budget():
            for _, stats, mask in self._passes(data, loss_fn, "train_loss", "covariance", batch_size=covariance_batch_size):
                for name, (a, s) in stats.items():
                    count = a.shape[0] * a.shape[1] if mask is None else mask.sum()
                    if count == 0:
                        continue
                    A, S, n = cov[name]
                    with _layer_named(name):
                        A += ops.covariance(a, mask).double() * count
                        S += ops.covariance(s, mask).double() * count
                    n += count
            _distributed.all_reduce_sum_([t for sums in cov.values() for t in sums], self.process_group)
            eigen = {}
            for name in track(self.names, description="eigendecomposition", disable=not self._show_progress()):
                A, S, n = cov[name]
                if n == 0:
                    raise ValueError(f"Analyzer: layer {name!r}: every token is masked; no statistics to fit")
                eigen[name] = ops.eigen_factors(A / n, S / n, name=name)
            lam = {name: (self._zeros(name, d_out, d_in), self._zeros(name)) for name, (d_in, d_out) in dims.items()}
            for _, stats, mask in self._passes(data, loss_fn, "train_loss", "eigenvalue correction", batch_size=lambda_batch_size):
                for name, (a, s) in stats.items():
                    total, count = lam[name]
                    with _layer_named(name):
                        total += ops.lambda_correction(a, s, eigen[name].Q_A, eigen[name].Q_S, mask).double() * a.shape[0]
                    count += a.shape[0]
            _distributed.all_reduce_sum_([t for sums in lam.values() for t in sums], self.process_group)
        device = torch.device("cpu") if self.offload_factors else None
        self.factors = {
            name: EKFACFactors(*(t.to(device) if device else t for t in (eigen[name].Q_A, eigen[name].Q_S, total / count)))
            for name, (total, count) in lam.items()
        }
        return self.factors

    def _show_progress(self) -> bool:
        return self.progress and _distributed.rank_and_world(self.process_group)[0] == 0

    def _require_factors(self) -> None:
        if not self.factors:
            raise RuntimeError("Analyzer: no factors; call fit_factors or load_factors first")

    def _damping(self, name: str) -> float:
        return self.damping if self.damping is not None else reference.default_damping(self.factors[name].Lambda)

    def _factors_on(self, name: str, device: torch.device) -> EKFACFactors:
        factors = self.factors[name]
        return factors if factors.Lambda.device == device else EKFACFactors(*(t.to(device) for t in factors))

    # ---------------------------------------------------------------------------------------------
    # scores
    # ---------------------------------------------------------------------------------------------
    def _query_chunks(
        self, data: Data, measurement: LossFn, query_batch_size: Optional[int], rank: Optional[int], batch_size: Optional[int] = None
    ):
        """Preconditioned query gradients ``{name: (q, d_out, d_in)}`` (or `LowRankQuery`), in chunks
        of at least ``query_batch_size`` queries (all at once when None); a Dataset is batched by
        ``batch_size`` (default ``query_batch_size``). Every rank computes them all."""
        pending: Dict[str, List[Tensor]] = {name: [] for name in self.names}
        queued = 0
        passes = self._passes(data, measurement, "measurement", "query gradients", batch_size=batch_size or query_batch_size,
                              shard=False, dtype=self.score_dtype)
        for _, stats, mask in passes:
            for name, (a, s) in stats.items():
                pending[name].append(reference.per_example_gradients(a, s, mask))
            queued += next(iter(stats.values()))[0].shape[0]
            if query_batch_size is not None and queued >= query_batch_size:
                yield self._precondition(pending, rank)
                pending, queued = {name: [] for name in self.names}, 0
        if queued:
            yield self._precondition(pending, rank)

    def _precondition(self, gradients: Dict[str, List[Tensor]], rank: Optional[int]) -> dict:
        out = {}
        for name, parts in gradients.items():
            V = torch.cat(parts)
            with _layer_named(name):
                out[name] = ops.precondition(V, self._factors_on(name, V.device), damping=self._damping(name), rank=rank)
        return out

    def query_gradients(self, data: Data, measurement: LossFn, *, batch_size: Optional[int] = None, rank: Optional[int] = None):
        """Preconditioned query gradients per layer: ``{name: (Q, d_out, d_in)}`` or `LowRankQuery`."""
        self._require_factors()
        _require_data(data, "query_gradients")
        with self._chunk_budget():
            chunks = list(self._query_chunks(data, measurement, None, rank, batch_size))
        return chunks[0]

    def pairwise_scores(
        self,
        query_data: Data,
        measurement: LossFn,
        train_data: Data,
        loss_fn: LossFn,
        *,
        query_batch_size: Optional[int] = None,
        train_batch_size: Optional[int] = None,
        train_indices: Optional[Sequence[int]] = None,
        rank: Optional[int] = None,
        per_layer: bool = False,
    ) -> Union[Tensor, Dict[str, Tensor]]:
        """Influence of every training example on every query: ``(Q, N)`` summed over layers, or a
        dict of per-layer scores. N counts ``train_indices`` (in their order) when given.

        ``query_batch_size`` bounds the queries held (preconditioned, per layer) at once: one pass
        over the training data per chunk of queries. ``rank`` compresses each preconditioned query
        gradient to that rank (truncated SVD)."""
        self._require_factors()
        _require_data(query_data, "pairwise_scores (queries)")
        _require_data(train_data, "pairwise_scores (training data)")
        if rank is not None:
            check_int("Analyzer.pairwise_scores", "rank", rank, low=1)
        rows: Dict[str, List[Tensor]] = {name: [] for name in self.names}
        with self._chunk_budget():
            for queries in self._query_chunks(query_data, measurement, query_batch_size, rank):
                parts: Dict[str, list] = {name: [] for name in self.names}
                passes = self._passes(train_data, loss_fn, "train_loss", "pairwise scores", batch_size=train_batch_size,
                                      indices=train_indices, dtype=self.score_dtype)
                for k, stats, mask in passes:
                    for name, (a, s) in stats.items():
                        with _layer_named(name):
                            parts[name].append((k, ops.pairwise_scores(queries[name], a, s, mask=mask)))
                for name, scores in _distributed.gather_batches(parts, self.process_group).items():
                    rows[name].append(scores)
        scores = {name: torch.cat(chunks, dim=0) for name, chunks in rows.items()}
        return scores if per_layer else sum(scores.values())

    def self_scores(
        self,
        data: Data,
        loss_fn: LossFn,
        *,
        batch_size: Optional[int] = None,
        train_indices: Optional[Sequence[int]] = None,
        per_layer: bool = False,
    ) -> Union[Tensor, Dict[str, Tensor]]:
        """Self-influence ``<H^-1 g_n, g_n>`` of every training example: ``(N,)`` summed over layers,
        or a dict of per-layer scores."""
        self._require_factors()
        _require_data(data, "self_scores")
        parts: Dict[str, list] = {name: [] for name in self.names}
        on_device: Dict[str, EKFACFactors] = {}  # offloaded factors copied once per call
        with self._chunk_budget():
            passes = self._passes(data, loss_fn, "train_loss", "self scores", batch_size=batch_size, indices=train_indices, dtype=self.score_dtype)
            for k, stats, mask in passes:
                for name, (a, s) in stats.items():
                    if name not in on_device:
                        on_device[name] = self._factors_on(name, a.device)
                    with _layer_named(name):
                        parts[name].append((k, ops.self_scores(a, s, on_device[name], damping=self._damping(name), mask=mask)))
        scores = _distributed.gather_batches(parts, self.process_group)
        return scores if per_layer else sum(scores.values())

    # ---------------------------------------------------------------------------------------------
    # persistence
    # ---------------------------------------------------------------------------------------------
    def save_factors(self, path: str) -> None:
        """Write the fitted factors to a safetensors file (keys ``<layer>/Q_A|Q_S|Lambda``)."""
        from safetensors.torch import save_file

        self._require_factors()
        tensors = {f"{name}/{field}": t.contiguous().cpu() for name, f in self.factors.items() for field, t in f._asdict().items()}
        save_file(tensors, path)

    def load_factors(self, path: str) -> Dict[str, EKFACFactors]:
        """Read factors written by `save_factors`; every tracked layer must be present. They go to
        the layer's device (the CPU with ``offload_factors``)."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        missing = [name for name in self.names if f"{name}/Lambda" not in tensors]
        if missing:
            raise ValueError(f"Analyzer.load_factors: {path} has no factors for layers {missing}")
        modules = dict(self.model.named_modules())
        self.factors = {}
        for name in self.names:
            device = torch.device("cpu") if self.offload_factors else modules[name].weight.device
            self.factors[name] = EKFACFactors(*(tensors[f"{name}/{field}"].to(device) for field in EKFACFactors._fields))
        return self.factors


def _require_data(data, fn: str) -> None:
    """Empty data: a clear error before any pass (and before any collective)."""
    if _is_dataset(data) or hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"Analyzer.{fn}: the data is empty")


def _subset(data: Dataset, indices, what: str) -> List[int]:
    """The example indices to visit, validated (``train_indices`` or every example)."""
    n = len(data)
    if indices is None:
        return list(range(n))
    order = torch.as_tensor(indices).reshape(-1)
    if order.numel() == 0:
        raise ValueError(f"Analyzer ({what}): train_indices is empty")
    if order.dtype.is_floating_point or order.dtype == torch.bool:
        raise TypeError(f"Analyzer ({what}): train_indices must be integers, got {order.dtype}")
    if int(order.min()) < 0 or int(order.max()) >= n:
        raise ValueError(f"Analyzer ({what}): train_indices must lie in [0, {n}), got values in [{int(order.min())}, {int(order.max())}]")
    return order.tolist()
