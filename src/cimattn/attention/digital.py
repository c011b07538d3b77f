"""Exact digital softmax attention: the reference the hardware paths are compared with."""

from __future__ import annotations

import torch

from cimattn.attention.common import expand_kv, keep_mask


def digital_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax(q·kᵀ·scaling + mask)·v in fp32, returned as (B, T, H, D)."""
    groups = query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    k = expand_kv(key, groups).float()  # (B, H, S, D)
    v = expand_kv(value, groups).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # (B, H, T, S)
    keep = keep_mask(attention_mask, query, key, sliding_window)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully padded row attends to nothing
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, v).to(query.dtype)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None
