"""Triton kernels (GPU) of the hardware attention; their torch references live in `cimattn.attention` / `physics`.

Importing this package never needs Triton: the kernels are imported when first launched.
"""

from cimattn.kernels.gaincell import gaincell_prefill, triton_available, unsupported
from cimattn.kernels.sparse import kept_blocks as kept_blocks, sparse_attention as sparse_attention  # its unsupported(): kernels.sparse

__all__ = ["gaincell_prefill", "triton_available", "unsupported"]
