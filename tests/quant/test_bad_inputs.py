"""Every bad input gets an error naming the function, the argument, the expectation and what came."""
import pytest
import torch

import pyfast

quant = pyfast.quant
W = torch.randn(8, 32)


BAD_CALLS = [
    (lambda: quant.power_quantize(W, 5, 0.8), ValueError, r"power_quantize: bits must be one of \(3, 4, 8\), got 5"),
    (lambda: quant.power_quantize(W, 4.0, 0.8), TypeError, r"bits must be an int, got float"),
    (lambda: quant.power_quantize(W, 4, 0.0), ValueError, r"exponent must be finite and > 0, got 0.0"),
    (lambda: quant.power_quantize(W, 4, -1.0), ValueError, r"exponent must be finite and > 0, got -1.0"),
    (lambda: quant.power_quantize(W, 4, float("nan")), ValueError, r"exponent must be finite and > 0, got nan"),
    (lambda: quant.power_quantize(W, 4, "1"), TypeError, r"exponent must be a float, got str"),
    (lambda: quant.power_quantize(W, 4, 0.8, group_size=12), ValueError, r"group_size must divide w.shape\[1\] = 32 .*got 12"),
    (lambda: quant.power_quantize(W, 4, 0.8, group_size=0), ValueError, r"group_size must be in \[1, inf\], got 0"),
    (lambda: quant.power_quantize(W, 4, 0.8, axis=2), ValueError, r"axis must be in \[-2, 1\] for w of shape \(8, 32\), got 2"),
    (lambda: quant.power_quantize(W.long(), 4, 0.8), TypeError, r"w must have dtype in .*got torch.int64"),
    (lambda: quant.power_quantize(W.tolist(), 4, 0.8), TypeError, r"w must be a torch.Tensor, got list"),
    (lambda: quant.power_quantize(torch.tensor(1.0), 4, 0.8), ValueError, r"w must have at least one dimension"),
    (lambda: quant.power_quantize(W.index_fill(0, torch.tensor([2]), float("inf")), 4, 0.8, group_size=8), ValueError, r"w has 32 non-finite value\(s\)"),
    (lambda: quant.power_quantize(W, 4, 0.8, group_size=8, clip=0.0), ValueError, r"power_quantize: clip must be finite and > 0, got 0.0"),
    (lambda: quant.power_quantize(W, 4, 0.8, group_size=8, clip=torch.ones(8, 3)), ValueError, r"clip must be a float or a tensor of shape \(8, 4\) \(rows, groups\), got \(8, 3\)"),
    (lambda: quant.power_quantize(W, 4, 0.8, group_size=8, clip=-torch.ones(8, 4)), ValueError, r"clip must hold finite values > 0"),
    (lambda: quant.dequantize(W), TypeError, r"dequantize: q must be a QuantizedTensor \(from power_quantize\), got Tensor"),
    (lambda: quant.search_exponent(W[0], 4), ValueError, r"search_exponent: w must be 2-D \(out_features, in_features\), got shape \(32,\)"),
    (lambda: quant.search_exponent(W, 2), ValueError, r"bits must be one of"),
    (lambda: quant.search_exponent(W, 4, group_size=8, candidates=()), ValueError, r"candidates must not be empty"),
    (lambda: quant.search_exponent(W, 4, group_size=8, candidates=(0.5, -0.1)), ValueError, r"every entry of candidates must be finite and > 0, got -0.1"),
    (lambda: quant.search_exponent(W, 4, group_size=8, x=torch.randn(5, 31)), ValueError, r"x must have last dimension in_features = 32, got shape \(5, 31\)"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
