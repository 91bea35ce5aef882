import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from layer_workload import Kronfluence  # noqa: E402


@pytest.fixture
def kronfluence_layer():
    """``kronfluence_layer(layer, damping)`` -> `layer_workload.Kronfluence`; the test skips when
    kronfluence (an optional benchmark dependency) is not installed."""

    def make(layer, damping):
        pytest.importorskip("kronfluence", reason="kronfluence is an optional benchmark dependency")
        return Kronfluence(layer, damping)

    return make
