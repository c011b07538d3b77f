"""What every attention function shares: masks, positions, GQA expansion.

Shapes follow transformers' attention interface:
query (B, H, T, D); key, value (B, Hkv, S, D) — with a cache, S is every
stored token and the T queries are the last T positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import sdpa_mask

from cimattn.errors import CimattnError

# where a hardware attention's heavy part runs: "auto" = its Triton kernel on CUDA when the kernel
# supports the call, else the torch reference; "triton" = always (an error names what the call lacks); "torch"
BACKENDS = ("auto", "triton", "torch")


def use_kernel(backend: str, on_cuda: bool, unsupported: Callable[[], str | None]) -> bool:
    """Whether a call takes the Triton kernel, for a module's `backend` (see BACKENDS)."""
    if backend not in BACKENDS:
        raise CimattnError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        reason = unsupported()
        if reason is not None:
            raise CimattnError(f"attention backend 'triton': {reason}")
        return True
    return on_cuda and unsupported() is None


def boolean_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers mask function for our attention names: a boolean mask, True = attend.

    sdpa's own function may return None for a plain causal batch (SDPA then
    uses is_causal); our functions always want the explicit pattern.
    """
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or ±Inf in `x`: one reduction, since a NaN or an infinity makes the sum non-finite; only a sum
    that overflowed (or one of those) pays for the elementwise test."""
    total = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def positions(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the queries (T,) and keys (S,): keys 0..S−1, queries the last T."""
    t, s = query.shape[-2], key.shape[-2]
    key_pos = torch.arange(s, device=query.device)
    return key_pos[s - t :], key_pos


def keep_mask(
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask of the keys each query may see.

    Causality comes from transformers' mask when given (it also holds padding),
    else from positions; `window` keeps only the last `window` positions
    (query included), the sliding window of the hardware or the model.
    """
    q_pos, k_pos = positions(query, key)
    age = q_pos[:, None] - k_pos[None, :]  # (T, S) tokens since each key was written
    keep = age >= 0
    if window is not None:
        keep = keep & (age < window)
    keep = keep[None, None]
    if attention_mask is not None:
        given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        keep = keep & given[..., -key.shape[-2] :]
    return keep


def token_age(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(T, S) age of each key at each query, in tokens (negative = future)."""
    q_pos, k_pos = positions(query, key)
    return q_pos[:, None] - k_pos[None, :]


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, D) → (B, Hkv·groups, S, D): each KV head serves `groups` query heads."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)
