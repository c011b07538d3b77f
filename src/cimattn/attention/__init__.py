"""Attention functions registered with transformers' AttentionInterface.

Any model whose attention goes through the interface switches with
`model.set_attn_implementation(IMPLEMENTATIONS[family])`.  Each name also
registers a boolean mask function: without one transformers passes
`attention_mask=None` to a custom name and padding is silently lost.
The hardware families simulate their arrays in fp32 (fp64 when given) even
when the model's digital layers run under autocast (`Adapt.mixed_precision`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from cimattn.attention.common import boolean_mask
from cimattn.attention.digital import digital_attention
from cimattn.attention.gaincell import gaincell_attention
from cimattn.attention.prune_recompute import prune_recompute_attention
from cimattn.physics.gaincell import SURROGATE_GRADIENT_DTYPE

# family (the preset's `attention` field) → registered implementation name
IMPLEMENTATIONS: dict[str, str] = {}


def register(family: str, function: Callable) -> str:
    name = f"cimattn_{family}"
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, boolean_mask)
    IMPLEMENTATIONS[family] = name
    return name


def without_autocast(function: Callable) -> Callable:
    """`function` with autocast off: its own arithmetic decides its precision, not the digital layers' autocast.

    Only the products of the gain cells' surrogate gradient take the autocast precision
    (`cimattn.physics.gaincell.SURROGATE_GRADIENT_DTYPE`): they approximate the gradient anyway.
    """

    @functools.wraps(function)
    def wrapped(module, query: torch.Tensor, *args, **kwargs):
        device = query.device.type
        token = SURROGATE_GRADIENT_DTYPE.set(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        try:
            with torch.autocast(device, enabled=False):
                return function(module, query, *args, **kwargs)
        finally:
            SURROGATE_GRADIENT_DTYPE.reset(token)

    return wrapped


register("digital", digital_attention)
register("gaincell", without_autocast(gaincell_attention))
register("prune_recompute", without_autocast(prune_recompute_attention))

__all__ = ["IMPLEMENTATIONS", "digital_attention", "gaincell_attention", "prune_recompute_attention", "register"]
