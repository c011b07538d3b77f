"""Differentiable device and circuit behaviour: pure torch functions of tensors and config, no model knowledge."""

from cimattn.physics.gaincell import (
    Decay,
    Terms,
    cell,
    cell_scores,
    cell_terms,
    cell_weighted_sum,
    divide_by_sum_column,
    hard_sigmoid,
    leakage_decay,
    max_query_block,
    read_noise,
    scores_from_terms,
    stored_terms,
    tile_readout,
    variability_gain,
    weighted_sum_from_terms,
    with_sum_column,
)
from cimattn.physics.quantize import clamp, grid_anchor, quantize

__all__ = [
    "Decay", "Terms", "cell", "cell_scores", "clamp", "cell_terms", "cell_weighted_sum", "divide_by_sum_column", "grid_anchor", "hard_sigmoid",
    "leakage_decay", "max_query_block", "quantize", "read_noise", "scores_from_terms", "stored_terms", "tile_readout", "variability_gain",
    "weighted_sum_from_terms", "with_sum_column",
]
