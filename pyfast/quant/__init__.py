"""Power-exponent quantization (PowerQuant / NUPES): a non-uniform grid ``sign(t)|t|^(1/a)``.

    r = pyfast.quant.search_exponent(w, bits=4, group_size=128)          # exponent and clips
    q = pyfast.quant.power_quantize(w, 4, r.exponent, clip=r.clip)       # packed codes + scales
    y = pyfast.quant.power_linear(x, q)                                  # x W^T, W decoded on the fly
"""
from . import reference
from .io import load_quantized, save_quantized
from .nupes import NupesResult, fake_quantize, nupes_calibrate
from .nn import PowerQuantLinear, QuantizationReport, quantize_model
from .ops import dequantize, power_linear, power_quantize, search_activation_exponent, search_exponent
from .reference import SUPPORTED_BITS, QuantizedTensor, SearchResult, levels

__all__ = [
    "PowerQuantLinear",
    "NupesResult",
    "QuantizationReport",
    "QuantizedTensor",
    "SUPPORTED_BITS",
    "SearchResult",
    "dequantize",
    "fake_quantize",
    "levels",
    "load_quantized",
    "nupes_calibrate",
    "power_linear",
    "power_quantize",
    "quantize_model",
    "reference",
    "save_quantized",
    "search_activation_exponent",
    "search_exponent",
]
