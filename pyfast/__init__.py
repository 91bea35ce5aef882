"""pyfast: compiled kernels for PyTorch.

Families: `pyfast.moe` (sparse Mixture-of-Experts), `pyfast.gp` (Kronecker-structured Gaussian
processes on grids), `pyfast.ssm` (state-space convolution kernels), `pyfast.influence` (EK-FAC
influence functions), `pyfast.quant` (power-exponent quantization). Every op has a pure-torch reference
(`pyfast.<family>.reference`) that defines it; `backend_for` says which implementation runs.
"""
__version__ = "0.1.0"

from ._backend import BACKENDS, backend_for, get_backend, use_backend  # noqa: E402
from ._checks import set_value_checks, value_checks_enabled  # noqa: E402
from . import gp, influence, moe, quant, ssm  # noqa: E402

__all__ = [
    "BACKENDS",
    "backend_for",
    "get_backend",
    "use_backend",
    "set_value_checks",
    "value_checks_enabled",
    "gp",
    "influence",
    "moe",
    "quant",
    "ssm",
]
