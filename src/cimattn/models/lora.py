"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention projections, as torch parametrizations.

`attach_lora(attention, rank)` makes every 2-D weight of an attention
module's own layers (q/k/v/o projections of Llama-likes, GPT-2's fused
c_attn and c_proj) read W + B·A, with B zero at the start, so the model is
unchanged until B trains.  Adapting only A, B and the hardware scalers keeps
what an adaptation ships to a few MB (SmolLM2-135M, rank 16: 1.8 M numbers)
against the 26.5 M of the full projections.  A parametrization rather than a
wrapper module keeps the modules' names and types, so transformers' own
attention code runs unchanged and the adapters ride along in
`named_parameters()` as `<layer>.parametrizations.weight.0.lora_a|lora_b`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

LORA = ".lora_"  # in the name of every adapter parameter


class LowRankDelta(nn.Module):
    """W ↦ W + B·A for a weight of shape (rows, cols): A (rank, cols), B (rows, rank)."""

    def __init__(self, rows: int, cols: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, cols, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(rows, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's weights, and peft's A

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.lora_b @ self.lora_a


def attach_lora(attention: nn.Module, rank: int) -> None:
    """Give every 2-D weight of `attention`'s child layers (not its hardware `cim`) a rank-`rank` adapter, once."""
    for name, layer in attention.named_children():
        weight = getattr(layer, "weight", None)
        if name == "cim" or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if parametrize.is_parametrized(layer, "weight"):  # converting again keeps the adapters it has
            continue
        rows, cols = weight.shape
        parametrize.register_parametrization(layer, "weight", LowRankDelta(rows, cols, rank, weight.device, weight.dtype))
