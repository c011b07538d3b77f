"""Sparse exact recompute over the kept keys (Triton); the torch reference is `cimattn.attention.prune_recompute`.

After selection, prune-and-recompute attention computes, for every query,
softmax(q·kᵀ·scaling) · v over the keys its row of the boolean keep mask
(B, H, T, S) holds — the digital core's exact recompute.  `sparse_attention`
does it FlashAttention-style, block by block, and skips every key block in
which no query of the query block keeps a key (`kept_blocks` lists the
others): that skipping is where it gains over dense attention.  The keep
mask already carries the causal / sliding-window / padding mask (selection
keeps only visible keys), so the kernel needs no mask of its own.

Forward only: prune-and-recompute trains nothing through the recompute
except the thresholds, and those learn through the soft mask of the torch
path (`cimattn.adapt.thresholds`), which never takes the kernel.
`unsupported` says, in one line, why a call cannot take the kernel (None
when it can), so the attention function can fall back to the torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cimattn.errors import CimattnError
from cimattn.kernels.common import MAX_HEAD_DIM, MIN_DOT, call_unsupported

BLOCK_M = 64  # queries per program
BLOCK_N = 64  # keys per block: the granularity at which unkept keys are skipped
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # loaded as is, computed in fp32


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None) -> str | None:
    """Why `sparse_attention(q, k, v, keep, scaling)` cannot run (one line), or None when it can.

    Without `keep` (an attention function deciding before its selection),
    every boolean mask broadcastable to (B, H, T, S) is assumed.
    """
    reason = call_unsupported(q, k, v)
    if reason is not None:
        return reason
    b, h, t, d = q.shape
    full = (b, h, t, k.shape[2])
    if keep is not None and (keep.dtype != torch.bool or keep.dim() != 4 or any(n not in (1, m) for n, m in zip(keep.shape, full))):
        return f"keep mask {keep.dtype} {tuple(keep.shape)}: expected a boolean mask broadcastable to (B, H, T, S) = {full}"
    if any(x.dtype not in DTYPES for x in (q, k, v)):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes fp16 / bf16 / fp32 (float64 takes the torch path)"
    if d > MAX_HEAD_DIM:
        return f"head dim {d}: the kernel holds a head in registers, at most {MAX_HEAD_DIM}"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return "inputs require grad: the kernel has no backward (training takes the torch path)"
    return None


def kept_blocks(keep: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks each query block visits: counts (B, H, ⌈T/block_m⌉) and blocks (B, H, ⌈T/block_m⌉, ⌈S/block_n⌉), int32.

    blocks[…, m, :counts[…, m]] are, in ascending order, the key blocks of
    `block_n` keys in which some query of query block m keeps a key; the
    rest of the row is unused.  keep: boolean (B, H, T, S).
    """
    b, h, t, s = keep.shape
    mb, nb = -(-t // block_m), -(-s // block_n)
    padded = F.pad(keep, (0, nb * block_n - s, 0, mb * block_m - t))  # padding keeps nothing
    any_kept = padded.view(b, h, mb, block_m, nb, block_n).any(5).any(3)  # (B, H, MB, NB)
    counts = any_kept.sum(-1, dtype=torch.int32)
    blocks = torch.argsort((~any_kept).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept first, in order
    return counts.contiguous(), blocks.contiguous()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    block_m: int | None = None,
    block_n: int = BLOCK_N,
    precision: str = "ieee",
) -> torch.Tensor:
    """Softmax attention over the kept keys only: q (B, H, T, D), k, v (B, Hkv, S, D), keep (B, H, T, S) → (B, H, T, D) fp32.

    Query t attends to the keys s with keep[b, h, t, s], with weights
    softmax(q·kᵀ·scaling) over those keys; a query keeping none gets 0 (the
    torch path's padded rows).  GQA: query head h reads KV head
    h // (H / Hkv).  keep may broadcast (e.g. (B, 1, T, S)).

    Supported (else CimattnError naming the reason, see `unsupported`):
    CUDA tensors (or TRITON_INTERPRET=1); fp16 / bf16 / fp32 inputs, any
    strides; head dim ≤ 256; forward only.  Arithmetic is fp32;
    `precision` is tl.dot's input precision: "ieee" (default, exact fp32:
    the accuracy the tests hold) or, on GPUs, "tf32x3" / "tf32" (tensor
    cores, less accurate; not validated yet).  block_m (default: the query
    count rounded up to a power of two, 16 to BLOCK_M, half that for head
    dims > 128) and block_n are powers of two ≥ 16.
    """
    reason = unsupported(q, k, v, keep)
    if reason is not None:
        raise CimattnError(f"sparse recompute Triton kernel: {reason}")
    b, h, t, d = q.shape
    s = k.shape[2]
    block_d = max(MIN_DOT, 1 << (d - 1).bit_length())
    most = BLOCK_M if block_d <= 128 else BLOCK_M // 2  # q and the accumulator of a wide head live in registers
    block_m = block_m or min(most, max(MIN_DOT, 1 << (t - 1).bit_length()))
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < MIN_DOT or size & (size - 1):
            raise CimattnError(f"sparse recompute Triton kernel: {name} = {size}: expected a power of two ≥ {MIN_DOT}")
    from cimattn.kernels.triton_sparse import sparse_attention_fwd

    keep = keep.expand(b, h, t, s)
    counts, blocks = kept_blocks(keep, block_m, block_n)
    mask = keep.view(torch.uint8)  # the same bytes; Triton loads it as integers
    out = torch.empty((b, h, t, d), dtype=torch.float32, device=q.device)
    grid = (counts.shape[-1], b * h)
    sparse_attention_fwd[grid](
        q, k, v, mask, blocks, counts, out,
        *q.stride(), *k.stride(), *v.stride(), *mask.stride(), *blocks.stride(), *counts.stride(), *out.stride(),
        h, t, s, d, h // k.shape[1], float(scaling),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision,
    )
    return out
