"""pyfast: compiled kernels for PyTorch.

Families: `pyfast.moe` (sparse Mixture-of-Experts routing), `pyfast.quant` (power-exponent
quantization). Every op has a pure-torch reference
(`pyfast.<family>.reference`) that defines it; `backend_for` says which implementation runs.
"""
__version__ = "0.1.0"

from ._backend import BACKENDS, backend_for, get_backend, use_backend  # noqa: E402
from ._checks import set_value_checks, value_checks_enabled  # noqa: E402
from . import moe, quant  # noqa: E402

__all__ = [
    "BACKENDS",
    "backend_for",
    "get_backend",
    "use_backend",
    "set_value_checks",
    "value_checks_enabled",
    "moe",
    "quant",
]
