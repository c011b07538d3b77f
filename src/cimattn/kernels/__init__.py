"""Triton kernels (GPU) of the hardware attention; their torch references live in `cimattn.attention` / `physics`.

Importing this package never needs Triton: the kernels are imported when first launched.
"""

from cimattn.kernels.gaincell import gaincell_prefill, triton_available, unsupported

__all__ = ["gaincell_prefill", "triton_available", "unsupported"]
