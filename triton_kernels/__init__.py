"""Triton GPU kernels of pyfast, installed as ``pyfast.triton_kernels`` (use relative imports only)."""
