"""Pareto fronts and exact hypervolume (all objectives minimised).

Hypervolume by slicing (HSO, While et al., IEEE TEC 2006): sort on the last objective,
cut the dominated region into slabs between consecutive values and recurse on the
slab's front in one dimension fewer; 2-D is the closed-form staircase.  Exact, and fast
enough for the few hundred points and ≤ 4 objectives of a study.
"""

from __future__ import annotations

import numpy as np


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for the points no other point dominates (≤ everywhere, < somewhere)."""
    pts = np.asarray(points, dtype=float)
    keep = np.ones(len(pts), dtype=bool)
    for i, p in enumerate(pts):
        others = np.delete(pts, i, axis=0)
        if len(others) and np.any(np.all(others <= p, axis=1) & np.any(others < p, axis=1)):
            keep[i] = False
    return keep


def hypervolume(points, ref) -> float:
    """Volume dominated by `points` (n, m) and bounded by the reference point `ref` (m,)."""
    ref = np.asarray(ref, dtype=float)
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return _hv(pts[pareto_mask(pts)], ref)


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    if pts.shape[1] == 2:
        pts = pts[np.argsort(pts[:, 0])]
        ys = np.minimum.accumulate(pts[:, 1])  # best y reached up to each x
        xs = np.append(pts[1:, 0], ref[0])
        return float(np.sum((xs - pts[:, 0]) * (ref[1] - ys)))
    pts = pts[np.argsort(pts[:, -1])]
    volume = 0.0
    for i in range(len(pts)):
        top = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if top > pts[i, -1]:
            slab = pts[: i + 1, :-1]  # the points below this slab, projected
            volume += (top - pts[i, -1]) * _hv(slab[pareto_mask(slab)], ref[:-1])
    return volume
