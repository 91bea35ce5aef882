"""Shared benchmark helpers: device, quick mode, and how a measurement is recorded.

Every benchmark is one (workload, provider) pair; providers are ``pyfast``, ``reference`` and
``torch-native`` (the best plain-torch code). ``extra_info`` carries what the report needs:
workload, provider, bytes moved and the floor-relevant sizes.
"""
import os

import torch

QUICK = os.environ.get("PYFAST_BENCH_QUICK", "0") == "1"
FULL = os.environ.get("PYFAST_BENCH_FULL", "0") == "1"


def bench_device() -> torch.device:
    name = os.environ.get("PYFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(benchmark, fn, *, workload: str, provider: str, bytes_moved: int, device: torch.device, rounds=None):
    """Time ``fn`` (medians over rounds; CUDA work is synchronized inside the timed call)."""
    benchmark.group = workload
    benchmark.extra_info.update(workload=workload, provider=provider, bytes_moved=int(bytes_moved), device=str(device))
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(device)
    else:
        timed = fn
    if rounds is None:
        rounds = 3 if QUICK else (20 if device.type == "cuda" else 5)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
