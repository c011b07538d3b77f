"""Triton kernels (GPU) of the hardware attention; their torch references live in `cimattn.attention` / `physics`.

Importing this package never needs Triton: the kernels are imported when first launched.
"""

from cimattn.kernels.common import triton_available
from cimattn.kernels.gaincell import gaincell_prefill, unsupported
from cimattn.kernels.sparse import kept_blocks, sparse_attention  # its own unsupported(): kernels.sparse.unsupported

__all__ = ["gaincell_prefill", "kept_blocks", "sparse_attention", "triton_available", "unsupported"]
