"""Backend choice: auto, forced, visible reasons, and the reference path without compiled modules."""
import os
import subprocess
import sys

import pytest
import torch

import pyfast
from pyfast import _ext


def test_auto_picks_cpu_kernel_for_cpu_tensors():
    choice = pyfast.backend_for("moe.topk_gating", torch.zeros(2, 2))
    assert choice.backend == "cpu", choice.reason
    assert "cpu kernel for torch.float32" in choice.reason


def test_forced_reference_and_restored():
    with pyfast.use_backend("reference"):
        assert pyfast.backend_for("moe.permute", torch.zeros(2, 2)) == ("reference", "requested")
    assert pyfast.get_backend() == "auto"


def test_forced_backend_that_cannot_run_says_why():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the forced backends can run")
    with pyfast.use_backend("cuda"), pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but cannot run: pyfast._cuda runs CUDA tensors"):
        pyfast.moe.route(torch.zeros(3, 1, dtype=torch.int32), 2)


def test_unknown_names():
    with pytest.raises(ValueError, match=r"use_backend: name must be one of"):
        with pyfast.use_backend("tpu"):
            pass
    with pytest.raises(KeyError, match=r"unknown op 'moe.nope'"):
        pyfast.backend_for("moe.nope", torch.zeros(1))


def test_env_variable_selects_backend():
    code = "import pyfast, torch; print(pyfast.backend_for('moe.route', torch.zeros(1, dtype=torch.int32)).backend)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYFAST_BACKEND": "reference"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_works_without_compiled_module():
    """A package whose pyfast._C is missing still imports, routes through the reference and says why."""
    code = (
        "import sys; sys.modules['pyfast._C'] = None\n"
        "import torch, pyfast\n"
        "from pyfast import _ext\n"
        "print(_ext.cpu_error)\n"
        "c = pyfast.backend_for('moe.topk_gating', torch.zeros(2, 2)); print(c.backend, '|', c.reason)\n"
        "w, e = pyfast.moe.topk_gating(torch.randn(5, 8), 2)\n"
        "xs, r = pyfast.moe.permute(torch.randn(5, 3), e, 8)\n"
        "print(tuple(pyfast.moe.unpermute(xs, w, r).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert "import of pyfast._C halted" in lines[0]
    assert lines[1].startswith("reference | pyfast._C is unavailable")
    assert lines[2] == "(5, 3)"


def test_compiled_module_loaded_here():
    assert _ext.cpu is not None, _ext.cpu_error


def test_cpu_path_of_torch_code_is_named():
    choice = pyfast.backend_for("ssm.fft_conv", torch.zeros(2, 2))
    assert choice.backend == "cpu"
    assert choice.reason.startswith("torch.fft"), choice.reason
    with pytest.raises(ValueError, match="cpu_path given for x.y without cpu dtypes"):
        pyfast._backend.register_op("x.y", cpu_path="torch code")
