"""Static local patterns over the (frames, rows, cols) grid: `diagonal` and `multi_diagonal`.

A key block is visited when any of its tokens lies inside the window of any token of the query block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import BlockLayout, Grid, num_blocks
from . import register
from .base import BuildContext, Param, Strategy, check_extents, resolve_extent

_QUERY_BLOCK_CHUNK = 64


def _dilate(occupancy: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """Max-dilate (N, F, H, W) along one grid axis by +/- radius."""
    if radius <= 0:
        return occupancy
    moved = occupancy.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    pooled = F.max_pool1d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return pooled.reshape(shape).movedim(-1, axis)


def window_layout(grid: Grid, block_q: int, block_k: int, half_widths: tuple[int, int, int]) -> BlockLayout:
    """Layout of the 3D window |df| <= t, |dy| <= h, |dx| <= w (half-widths in tokens)."""
    seq = grid.num_tokens
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    radii = [min(r, size - 1) for r, size in zip(half_widths, (grid.frames, grid.height, grid.width))]
    tokens = torch.arange(seq)
    masks = []
    for start in range(0, nq, _QUERY_BLOCK_CHUNK):
        stop = min(start + _QUERY_BLOCK_CHUNK, nq)
        occupancy = torch.zeros(stop - start, seq)
        in_chunk = (tokens // block_q >= start) & (tokens // block_q < stop)
        occupancy[tokens[in_chunk] // block_q - start, tokens[in_chunk]] = 1.0
        reach = occupancy.view(-1, grid.frames, grid.height, grid.width)
        for axis, radius in enumerate(radii, start=1):
            reach = _dilate(reach, axis, radius)
        reach = F.pad(reach.reshape(stop - start, seq), (0, nk * block_k - seq))
        masks.append(reach.view(stop - start, nk, block_k).amax(-1) > 0)
    return BlockLayout.from_block_mask(torch.cat(masks).view(1, 1, nq, nk), seq, block_q, block_k)


@register
class Diagonal(Strategy):
    name = "diagonal"
    params = {
        "window": Param(
            (1, 0.25, 0.25), check_extents(3),
            "half-widths (frames, rows, cols): ints are tokens, floats fractions of the grid",
        )
    }

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        g = ctx.grid
        half = tuple(resolve_extent(v, n) for v, n in zip(params["window"], (g.frames, g.height, g.width)))
        return window_layout(g, ctx.block_q, ctx.block_k, half)


@register
class MultiDiagonal(Strategy):
    """The same spatial neighbourhood in every frame: temporal stripes at offsets of multiples of H*W."""

    name = "multi_diagonal"
    params = {
        "window": Param((0.125, 0.125), check_extents(2), "half-widths (rows, cols) applied in every frame"),
    }

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        g = ctx.grid
        h, w = (resolve_extent(v, n) for v, n in zip(params["window"], (g.height, g.width)))
        return window_layout(g, ctx.block_q, ctx.block_k, (g.frames, h, w))
