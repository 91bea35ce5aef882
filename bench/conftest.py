"""Shared setup of the benchmark suites (`pyfast bench` runs them; plain `pytest bench` works too).

Every benchmark is one (workload, provider) pair; the providers are ``pyfast`` (the public ops),
``reference`` (`pyfast.<family>.reference`) and ``torch-native`` (the best plain-torch code).

Options (each also read from an environment variable, which is how `pyfast bench` sets them):
  --quick / PYFAST_BENCH_QUICK=1         small sizes only (tests marked ``large`` are deselected),
                                         a short timing budget per benchmark
  --bench-device / PYFAST_BENCH_DEVICE   ``cuda`` or ``cpu``; default cuda when available
Markers: ``large`` (skipped by --quick), ``cpu_only`` (deselected on CUDA).

torch._dynamo is imported up front: torch imports it on the first custom-op call of a process
(1-2 s), which made the first pyfast provider of a run look slow and get timed once.

The `measure` fixture runs a workload: one untimed call (warm-up; its output is checked when the
test passes ``check``), a second untimed call that sizes the number of rounds (skipped for slow
CPU calls), then ``benchmark.pedantic`` rounds of one call each, as many as fit the time budget
within the bounds of ``ROUNDS`` (at least 3 on the CPU, 10 on CUDA, 5 on CUDA with --quick), and
one round for a call longer than the whole budget.
On CUDA the timed function ends with ``torch.cuda.synchronize()`` so each round times the whole
kernel chain. ``extra_info`` records what the report needs: suite, workload, provider, bytes
moved, sizes and device.
"""
import os
import time
from typing import Callable, Dict, Optional

import pytest
import torch
import torch._dynamo  # noqa: F401  (see the module docstring)

# (budget seconds per benchmark, min rounds, max rounds)
ROUNDS = {
    ("cpu", False): (2.0, 3, 50),
    ("cpu", True): (0.5, 3, 20),
    ("cuda", False): (1.0, 10, 500),
    ("cuda", True): (0.2, 5, 50),
}


def pytest_addoption(parser):
    group = parser.getgroup("pyfast-bench")
    group.addoption("--quick", action="store_true", default=os.environ.get("PYFAST_BENCH_QUICK", "0") == "1",
                    help="small sizes and short timing budgets (env PYFAST_BENCH_QUICK=1)")
    group.addoption("--bench-device", choices=("cuda", "cpu"), default=os.environ.get("PYFAST_BENCH_DEVICE") or None,
                    help="device to benchmark (env PYFAST_BENCH_DEVICE); default cuda when available")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a big size, deselected by --quick")
    config.addinivalue_line("markers", "cpu_only: run on the CPU only (e.g. float32 variants)")
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("pyfast bench: --bench-device cuda was requested but no CUDA device is available")
    config._pyfast_device = torch.device(name)


def pytest_collection_modifyitems(config, items):
    quick = config.getoption("--quick")
    on_cuda = config._pyfast_device.type == "cuda"
    keep, drop = [], []
    for item in items:
        if (quick and "large" in item.keywords) or (on_cuda and "cpu_only" in item.keywords):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return pytestconfig._pyfast_device


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--quick")


def _synchronized(fn: Callable, device: torch.device) -> Callable:
    if device.type != "cuda":
        return fn

    def timed():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return timed


@pytest.fixture
def measure(benchmark, device, quick):
    """``measure(fn, suite=, workload=, provider=, bytes_moved=, sizes=, check=None)`` times
    ``fn()`` as described in the module docstring."""

    def run(fn: Callable, *, suite: str, workload: str, provider: str, bytes_moved: int,
            sizes: Dict[str, object], check: Optional[Callable] = None) -> None:
        timed = _synchronized(fn, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = timed()  # warm-up (first-call costs: kernel compilation, allocator growth)
        first = time.perf_counter() - start
        if check is not None:
            check(out)
        del out
        budget, least, most = ROUNDS[(device.type, quick)]
        # Time a second call to size the rounds (the first may include compilation), unless a
        # CPU call is so slow that the minimum number of rounds is the answer anyway.
        if device.type == "cuda" or first < budget / 2:
            start = time.perf_counter()
            timed()
            first = time.perf_counter() - start
        # A call longer than the whole budget (a reference at full size on the CPU) is timed once:
        # its run-to-run spread is small next to its length, and three rounds of a minute-long
        # call would dominate the suite.
        rounds = 1 if first >= budget else max(least, min(most, int(budget / max(first, 1e-7))))

        benchmark.group = f"{suite} | {workload}"
        benchmark.extra_info.update(suite=suite, workload=workload, provider=provider,
                                    bytes_moved=int(bytes_moved), sizes=sizes, device=str(device))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    return run


@pytest.fixture(scope="session")
def expect_close():
    """``expect_close(ref, tol, what)`` -> a ``check`` for `measure`: the benchmarked output must
    match ``ref`` to ``|out - ref| / |ref| <= tol`` (norms, float64; NaN fails)."""

    def make(ref: torch.Tensor, tol: float, what: str) -> Callable:
        def check(out) -> None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            refs = ref if isinstance(ref, (tuple, list)) else (ref,)
            for o, r in zip(outs, refs):
                o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
                assert o64.shape == r64.shape, f"{what}: shape {tuple(o64.shape)} != {tuple(r64.shape)}"
                err = ((o64 - r64).norm() / r64.norm().clamp_min(1e-300)).item()
                assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"  # NaN fails too

        return check

    return make
