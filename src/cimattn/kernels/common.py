"""What every Triton kernel launcher of cimattn shares: whether Triton can run here, and the attention-call checks."""

from __future__ import annotations

import os

import torch

MIN_DOT = 16  # tl.dot needs every block dimension ≥ 16
MAX_HEAD_DIM = 256  # the kernels hold a head in registers


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def call_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why an attention call q (B, H, T, D), k, v (B, Hkv, S, D) cannot take a Triton kernel at all (one line), or None."""
    if not triton_available():
        return "triton is not installed (pip install triton)"
    if not (q.is_cuda or interpreting()):
        return f"tensors on {q.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for tests)"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (B, H, T, D) and equal (B, Hkv, S, D)"
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or h % k.shape[1]:
        return f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (batch, head dim, heads a multiple of KV heads)"
    return None
