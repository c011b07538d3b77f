"""Attention functions registered with transformers' AttentionInterface.

Any model whose attention goes through the interface switches with
`model.set_attn_implementation(IMPLEMENTATIONS[family])`.  Each name also
registers a boolean mask function: without one transformers passes
`attention_mask=None` to a custom name and padding is silently lost.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from cimattn.attention.common import boolean_mask
from cimattn.attention.digital import digital_attention
from cimattn.attention.gaincell import gaincell_attention
from cimattn.attention.prune_recompute import prune_recompute_attention

# family (the preset's `attention` field) → registered implementation name
IMPLEMENTATIONS: dict[str, str] = {}


def register(family: str, function: Callable) -> str:
    name = f"cimattn_{family}"
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, boolean_mask)
    IMPLEMENTATIONS[family] = name
    return name


register("digital", digital_attention)
register("gaincell", gaincell_attention)
register("prune_recompute", prune_recompute_attention)

__all__ = ["IMPLEMENTATIONS", "digital_attention", "gaincell_attention", "prune_recompute_attention", "register"]
