"""Benchmark suites: `pyfast bench` runs them; see bench_utils.py for the shared helpers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_utils import bench_device  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()
