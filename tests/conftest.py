"""Shared test setup: which kernel backends run here, and skips for `triton` / `gpu` tests.

Normal run: `pytest` runs the CPU kernels (pyfast._C) and the reference. Triton run:
`TRITON_INTERPRET=1 pytest -m triton` runs the Triton kernels on the CPU through the interpreter
(float32/float16, small shapes). On a CUDA machine the `triton` and `gpu` tests run on the GPU.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ["PYFAST_POISON"] = "1"  # kernel outputs start as NaN / sentinel (pyfast/_alloc.py)

from kernel_cases import KERNEL_PARAMS, make_case  # noqa: E402
from pyfast import _ext  # noqa: E402


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    triton_ok, triton_why = _ext.triton_status()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif "triton" in item.keywords and not triton_ok:
            item.add_marker(pytest.mark.skip(reason=f"Triton cannot run here: {triton_why}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=KERNEL_PARAMS)
def kernel(request):
    """One kernel backend under test (see tests/kernel_cases.py)."""
    return make_case(request.param)
