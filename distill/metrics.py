"""Distances between sets of samples (distribution matching is judged on distributions, not per sample)."""

from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (N, ...) and (M, ...).

    Euclidean norms of the flattened samples; the within-set terms leave out the zero diagonal (unbiased
    U-statistics), so two sets from one distribution give about 0 (slightly negative values are possible).
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("energy distance needs at least two samples per set")
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)
