"""State-space model convolution: S4D / S4-PTD kernels, FFT long convolution, recurrent step."""
from . import reference

__all__ = ["reference"]
