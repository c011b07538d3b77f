"""Clamp-and-round converters: the query DAC (pulse width), the stored K/V voltage, the A·V read-out ADC.

Forward: clamp to [low, high], then round to the converter's grid.  Backward:
straight-through — gradient 1 inside the clamp range, 0 outside it (the
clamp's own gradient), as in Leroux et al.'s quantisation-aware training
(shared/PAPERS.md §1).

The grid is `step = (high − low) / (levels − 1)` wide.  Where 0 lies in
[low, high] the grid holds 0 (mid-tread): the authors' code rounds
`step · round(x / step)`.  For the three Leroux converters this gives
Q ∈ {k/15}, K, V ∈ {k·0.9/7} and the A·V read-out ∈ {k·2/31}.  Faithful to
that code, an A·V input exactly at ±1 (a saturated tile) rounds half-to-even
to ±32/31, one half-step beyond the clamp bound; everything strictly inside
(−1, 1) stays within ±30/31.  Ranges that exclude 0 use a grid starting at
`low`.
"""

from __future__ import annotations

import torch

from cimattn.config.schema import Quantizer


def grid_anchor(q: Quantizer) -> float:
    """The value the rounding grid is pinned to: 0 when the range holds it (authors' code), else `low`."""
    return 0.0 if q.low <= 0.0 <= q.high else q.low


def quantize(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """Clamp `x` to [q.low, q.high] and round to q.levels levels (none if levels is null); STE gradient."""
    clamped = x.clamp(q.low, q.high)  # the clamp zeroes the gradient out of range
    if q.levels is None:
        return clamped
    step, anchor = q.step, grid_anchor(q)
    recording = clamped.requires_grad
    with torch.no_grad():
        # without a gradient to keep, round the clamp's fresh output in place: one tensor, not three
        rounded = clamped if not recording else clamped.clone()
        (rounded.sub_(anchor) if anchor else rounded).div_(step).round_().mul_(step)
        if anchor:
            rounded.add_(anchor)
    if not recording:
        return rounded
    # straight-through: forward the rounded value, backward the identity of the clamped one
    return clamped + (rounded - clamped).detach()
