"""Differentiable device and circuit behaviour: pure torch functions of tensors and config, no model knowledge."""

from cimattn.physics.gaincell import (
    Decay,
    cell,
    cell_scores,
    cell_weighted_sum,
    hard_sigmoid,
    leakage_decay,
    max_query_block,
    read_noise,
    tile_readout,
    variability_gain,
)
from cimattn.physics.quantize import grid_anchor, quantize

__all__ = [
    "Decay", "cell", "cell_scores", "cell_weighted_sum", "grid_anchor", "hard_sigmoid", "leakage_decay", "max_query_block",
    "quantize", "read_noise", "tile_readout", "variability_gain",
]
