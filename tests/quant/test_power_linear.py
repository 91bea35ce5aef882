"""power_linear kernels against the float64 reference, gradients, dispatch, opcheck."""
import pytest
import torch

import pyfast
from kernel_cases import assert_close
from power_linear_cases import check_power_linear
from pyfast.quant import reference

quant = pyfast.quant

# (N, K, group_size, bits): primes and non-multiples of the kernels' blocks (8 codes, 32/64 columns);
# 4 bits with groups of 32k take the CPU byte-shuffle path at M = 1.
WEIGHTS = [(1, 8, 8, 4), (37, 64, 8, 3), (37, 48, 16, 4), (13, 40, 8, 8), (67, 136, 136, 4), (29, 72, 24, 3), (11, 96, 32, 4)]


def _rows(kernel):
    # CPU: decode path up to 16 rows, dequantize + GEMM above; Triton: GEMV up to 4, then tl.dot tiles.
    return (0, 1, 3, 9, 17) if kernel.interpreted else (0, 1, 3, 8, 9, 16, 17, 40)


def _quantized(N, K, group_size, bits, symmetric=True, device="cpu"):
    w = torch.randn(N, K, dtype=torch.float64) * torch.rand(1, K, dtype=torch.float64)
    return quant.power_quantize(w, bits, 0.73, group_size=group_size, symmetric=symmetric).to(device)


@pytest.mark.parametrize("N, K, group_size, bits", WEIGHTS)
def test_matches_reference(kernel, N, K, group_size, bits):
    for symmetric in (True, False):
        q = _quantized(N, K, group_size, bits, symmetric, kernel.device)
        check_power_linear(kernel, q, _rows(kernel), f"sym={symmetric}")


def test_batched_and_strided_inputs(kernel):
    q = _quantized(23, 64, 16, 4, device=kernel.device)
    base = torch.randn(2, 3, 128, device=kernel.device)
    x = base[..., ::2]  # stride 2 along K
    with pyfast.use_backend(kernel.backend):
        y = quant.power_linear(x, q)
    assert y.shape == (2, 3, 23)
    assert_close(y, reference.power_linear(x.double(), q), torch.float32, "strided")


def test_gradient_matches_reference(kernel):
    q = _quantized(19, 32, 8, 4, device=kernel.device)
    for M in (1, 5) if kernel.interpreted else (1, 5, 21):
        x = torch.randn(M, 32, device=kernel.device, requires_grad=True)
        grad_y = torch.randn(M, 19, device=kernel.device)
        with pyfast.use_backend(kernel.backend):
            (gx,) = torch.autograd.grad(quant.power_linear(x, q), x, grad_y)
        x64 = x.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(reference.power_linear(x64, q), x64, grad_y.double())
        assert_close(gx, ref, torch.float32, f"grad M={M}")


def test_reference_gradcheck():
    q = _quantized(7, 16, 8, 3)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.power_linear(t, q), (x,))


def test_dequantize_kernel(kernel):
    for N, K, group_size, bits in WEIGHTS:
        q = _quantized(N, K, group_size, bits, device=kernel.device)
        args = (q.codes, q.scales.float(), q.table(), None, bits, group_size, K)
        for dtype in kernel.dtypes:
            if dtype == torch.float64:
                continue
            out = torch.ops.pyfast.quant_dequantize(*args, dtype, kernel.backend)
            ref = reference.dequantize(q)
            assert out.dtype == dtype
            assert_close(out, ref, dtype, f"dequantize {bits} bits {dtype}")


def test_dispatch():
    q = _quantized(5, 24, 12, 4)  # group size not a multiple of 8: the reference runs
    x = torch.randn(2, 24)
    with pyfast.use_backend("cpu"):
        assert_close(quant.power_linear(x, q), reference.power_linear(x.double(), q), torch.float32)
    choice = pyfast.backend_for("quant.power_linear", torch.randn(2, 2, dtype=torch.float64))
    assert choice.backend == "reference" and "does not cover torch.float64" in choice.reason
    q8 = _quantized(5, 24, 8, 4)
    x64 = torch.randn(2, 24, dtype=torch.float64)
    torch.testing.assert_close(quant.power_linear(x64, q8), reference.power_linear(x64, q8), rtol=0, atol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kernel, requires_grad):
    q = _quantized(11, 32, 8, 4, device=kernel.device)
    table = q.table()
    for M in (1, 6) if kernel.interpreted else (1, 6, 20):
        x = torch.randn(M, 32, device=kernel.device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.pyfast.quant_power_linear, (x, q.codes, q.scales.float(), table, None, 4, 8, kernel.backend))
    torch.library.opcheck(
        torch.ops.pyfast.quant_dequantize, (q.codes, q.scales.float(), table, None, 4, 8, 32, torch.float32, kernel.backend)
    )


def test_bad_inputs():
    q = _quantized(5, 16, 8, 4)
    with pytest.raises(ValueError, match=r"power_linear: x must have last dimension in_features = 16, got shape \(2, 15\)"):
        quant.power_linear(torch.randn(2, 15), q)
    with pytest.raises(ValueError, match=r"power_linear: q is on meta but x is on cpu; move it with q.to\(x.device\)"):
        quant.power_linear(torch.randn(2, 16), q.to("meta"))
    with pytest.raises(TypeError, match=r"power_linear: q must be a QuantizedTensor"):
        quant.power_linear(torch.randn(2, 16), torch.randn(5, 16))
    q0 = quant.power_quantize(torch.randn(16, 5), 4, 0.8, group_size=8, axis=0)
    with pytest.raises(ValueError, match=r"power_linear: q must be a quantized Linear weight .* grouped along axis 0"):
        quant.power_linear(torch.randn(2, 16), q0)
    with pytest.raises(TypeError, match=r"power_linear: x must have dtype in"):
        quant.power_linear(torch.randint(0, 3, (2, 16)), q)


def test_compile_fullgraph():
    q = _quantized(13, 32, 8, 4)

    def f(x):
        return torch.relu(quant.power_linear(x, q)).sum()

    x = torch.randn(3, 32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(g_compiled, g_eager)


def test_public_dequantize_matches_reference(kernel):
    """`pyfast.quant.dequantize` runs the kernel for Linear-weight layouts and the reference otherwise."""
    with pyfast.use_backend(kernel.backend):
        for N, K, group_size, bits in WEIGHTS:
            q = _quantized(N, K, group_size, bits, device=kernel.device)
            for dtype in kernel.dtypes:
                if dtype == torch.float64:
                    continue
                out = pyfast.quant.dequantize(q, dtype)
                assert out.dtype == dtype and out.shape == (N, K)
                assert_close(out, reference.dequantize(q), dtype, f"public dequantize {bits} bits {dtype}")
        assert pyfast.backend_for("quant.dequantize", torch.empty(0, device=kernel.device)).backend == kernel.backend


def test_quantized_tensor_dequantize_method_is_the_fast_path(monkeypatch):
    q = quant.power_quantize(torch.randn(37, 64), 4, 0.8, group_size=16)
    expected = reference.dequantize(q)
    monkeypatch.setattr(reference, "dequantize", lambda *args: pytest.fail("QuantizedTensor.dequantize ran the reference"))
    with pyfast.use_backend("cpu"):
        assert torch.equal(q.dequantize(), expected) and q.dequantize(torch.bfloat16).dtype == torch.bfloat16
