"""Whole-model EK-FAC influence on a small causal transformer (see transformer_workload.py): fitting
the factors (covariance, eigendecomposition, Lambda), pairwise scores of every query against every
training sequence (query gradients included), and self-influence scores.

Providers: pyfast (`pyfast.influence.Analyzer`) and kronfluence (its Analyzer at its defaults, the
same conventions; skipped when kronfluence is not installed). Each stage's output is checked
against kronfluence's (scores within 1e-3 relative in norm, float32) when it is installed.

Bytes moved (floor): the layer inputs and output gradients of every tracked layer, once per pass
over the data (two passes to fit, query and training passes to score), in float32.
"""
import functools

import pytest
import torch

import transformer_workload as tw

SUITE = "influence whole model (small causal transformer)"
STAGES = ("fit", "pairwise_scores", "self_scores")


def _sizes_params():
    return [pytest.param(tw.FULL, marks=pytest.mark.large, id="d128-T64"), pytest.param(tw.QUICK, id="quick-d64-T32")]


def _kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _provider(sizes: tw.Sizes, name: str):
    """A provider with fitted factors (the scoring stages time scoring only)."""
    work = tw.setup(sizes)
    provider = tw.Pyfast(work) if name == "pyfast" else tw.Kronfluence(work)
    provider.fit()
    return provider


@functools.lru_cache(maxsize=8)
def _kronfluence_output(sizes: tw.Sizes, stage: str):
    return getattr(_provider(sizes, "kronfluence"), stage)()


def _bytes_moved(work: tw.Workload, stage: str) -> int:
    s = work.sizes
    per_example = sum(
        (m.in_features + 1 + m.out_features) * s.tokens for m in work.model.modules() if isinstance(m, torch.nn.Linear)
    )
    passes = {"fit": 2 * s.train, "pairwise_scores": s.train + s.queries, "self_scores": s.train}[stage]
    return passes * per_example * 4


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("provider", ["pyfast", "kronfluence"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sizes", _sizes_params())
def test_transformer_influence(measure, expect_close, device, sizes, stage, provider):
    if device.type != "cpu":
        pytest.skip("the whole-model workload runs on the CPU")
    if not _kronfluence_available() and provider == "kronfluence":
        pytest.skip("kronfluence is an optional benchmark dependency")
    work = tw.setup(sizes)
    runner = _provider(sizes, provider)
    check = None
    if _kronfluence_available() and stage != "fit":
        check = expect_close(_kronfluence_output(sizes, stage), 1e-3, f"{provider} {stage} vs kronfluence")
    measure(
        getattr(runner, stage),
        suite=SUITE,
        workload=f"{stage} {work.describe()}",
        provider=provider,
        bytes_moved=_bytes_moved(work, stage),
        sizes={**sizes._asdict(), "tracked_linears": work.linears, "dtype": "float32"},
        check=check,
    )
