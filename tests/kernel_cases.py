"""Kernel backends under test, and the float64-reference comparison rule of DESIGN.md."""
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

from pyfast import _ext

# Norm-relative error bounds against a float64 reference (DESIGN.md "Numerics and tolerances").
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class KernelCase:
    backend: str
    device: torch.device
    dtypes: Tuple[torch.dtype, ...]
    interpreted: bool  # Triton interpreter on the CPU: slow, keep shapes small

    def __str__(self):
        return self.backend


def _cpu_case() -> KernelCase:
    if _ext.cpu is None:
        pytest.fail(f"pyfast._C did not load: {_ext.cpu_error}")
    return KernelCase("cpu", torch.device("cpu"), (torch.float64, torch.float32, torch.float16, torch.bfloat16), False)


def _triton_case() -> KernelCase:
    if torch.cuda.is_available():
        return KernelCase("triton", torch.device("cuda"), (torch.float32, torch.float16, torch.bfloat16), False)
    # The interpreter computes bf16 dot products wrongly; float32/float16 only there.
    return KernelCase("triton", torch.device("cpu"), (torch.float32, torch.float16), True)


def _cuda_case() -> KernelCase:
    if _ext.cuda is None:
        pytest.fail(f"pyfast._cuda did not load: {_ext.cuda_error}")
    return KernelCase("cuda", torch.device("cuda"), (torch.float32, torch.float16, torch.bfloat16), False)


KERNEL_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
]
# The CUDA C++ backend implements only some ops (the `cuda=` entries of their register_op calls):
# the tests of those ops add this case to their `kernel` fixture.
CUDA_PARAM = pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)


def make_case(name: str) -> KernelCase:
    return {"cpu": _cpu_case, "triton": _triton_case, "cuda": _cuda_case}[name]()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` in norms, computed in float64; NaN anywhere gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    scale = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def assert_as_accurate_as_reference(out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, dtype, what=""):
    """For ill-conditioned results (sums with heavy cancellation) the DESIGN.md bound cannot hold
    for any implementation in ``dtype``; then FlashAttention's rule applies: the kernel's error
    against the float64 reference is at most twice that of the reference computed in ``dtype``."""
    err, ref_err = rel_error(out, ref64), rel_error(ref_low, ref64)
    bound = max(TOLERANCE[dtype], 2 * ref_err)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e} (reference in {dtype}: {ref_err:.3e})"
