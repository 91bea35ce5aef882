import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import pyfast  # noqa: E402
from kernel_cases import KernelCase  # noqa: E402
from pyfast.influence import _torch  # noqa: E402


def _torch_case() -> KernelCase:
    """The CPU path: chunked torch code (no C++ kernel beat it), forced to use many chunks."""
    return KernelCase("auto", torch.device("cpu"), (torch.float64, torch.float32, torch.float16, torch.bfloat16), False)


def _triton_case() -> KernelCase:
    if torch.cuda.is_available():
        return KernelCase("triton", torch.device("cuda"), (torch.float32, torch.float16, torch.bfloat16), False)
    return KernelCase("triton", torch.device("cpu"), (torch.float32, torch.float16), True)


@pytest.fixture(params=[pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)])
def path(request, monkeypatch):
    """One implementation under test, active for the test's duration (`pyfast.use_backend`)."""
    monkeypatch.setattr(_torch, "CHUNK_BYTES", 4096)  # several chunks even for small layers
    case = _torch_case() if request.param == "torch" else _triton_case()
    with pyfast.use_backend(case.backend):
        yield case


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def torch_path(request, monkeypatch):
    """The chunked torch code of ops without a kernel (precondition, pairwise_scores), per device."""
    monkeypatch.setattr(_torch, "CHUNK_BYTES", 4096)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    with pyfast.use_backend("auto"):
        yield KernelCase("auto", torch.device(request.param), dtypes, False)
