import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from kernel_cases import KERNEL_PARAMS, make_case  # noqa: E402


@pytest.fixture(params=KERNEL_PARAMS)
def kernel(request):
    """One kernel backend under test (see tests/kernel_cases.py)."""
    return make_case(request.param)
