"""Dynamic strategies estimated from mean-pooled q and k: `block_adaptive` (keep/drop) and `pyramid` (levels).

Block scores: pooled q . pooled k / sqrt(d) + ln(tokens in the key block), softmax over key blocks. Blocks are
ranked by that estimated mass; the diagonal blocks are always kept at full resolution, key blocks whose tokens
are not self-similar (mean cosine to their block mean below ``min_similarity``) are forced on, and query blocks
that are not self-similar attend densely, because pooling misjudges both.
"""

from __future__ import annotations

import math

import torch

from ..layout import MAX_LEVEL, BlockLayout, block_sizes, own_block_mask
from . import register
from .base import BuildContext, Param, Strategy, check_fraction
from .block_stats import BlockStats, block_stats


def _check_similarity(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        return f"must be a cosine in [-1, 1], got {value!r}"
    return None


def _check_topk(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be null or a positive number of key blocks, got {value!r}"
    return None


def _check_bands(value):
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVEL + 1:
        return f"must be a list of 1 to {MAX_LEVEL + 1} cumulative-mass thresholds, got {value!r}"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in value):
        return "each band must be in (0, 1]"
    if list(value) != sorted(value):
        return "bands must be ascending"
    return None


def ranked_block_mass(ctx: BuildContext, q_stats: BlockStats, k_stats: BlockStats):
    """Estimated attention mass per (B, G, NQ, NK), its descending order, and the mass ranked before each block."""
    scores = torch.einsum("bqgd,bkgd->bgqk", q_stats.mean, k_stats.mean) / math.sqrt(ctx.q.shape[-1])
    scores = scores + torch.log(block_sizes(ctx.seq_len, ctx.block_k, scores.device).float())
    mass = scores.softmax(-1)
    sorted_mass, order = mass.sort(-1, descending=True)
    mass_before = sorted_mass.cumsum(-1) - sorted_mass
    return mass, order, mass_before


def guards(ctx: BuildContext, q_stats: BlockStats, k_stats: BlockStats, min_similarity: float):
    """(forced key blocks (B, G, 1, NK), dense query rows (B, G, NQ, 1), own blocks (1, 1, NQ, NK))."""
    k_ok = k_stats.similarity >= min_similarity
    q_ok = q_stats.similarity >= min_similarity
    own = own_block_mask(ctx.seq_len, ctx.block_q, ctx.block_k, ctx.q.device)
    return (~k_ok).unsqueeze(2), (~q_ok).unsqueeze(3), own.view(1, 1, *own.shape)


def estimate(ctx: BuildContext, min_similarity: float):
    """Block statistics of q and k (one pass over each), then ``ranked_block_mass`` and ``guards``."""
    q_stats, k_stats = block_stats(ctx.q, ctx.block_q), block_stats(ctx.k, ctx.block_k)
    return ranked_block_mass(ctx, q_stats, k_stats), guards(ctx, q_stats, k_stats, min_similarity)


def _unsort(sorted_values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(sorted_values).scatter_(-1, order, sorted_values)


@register
class BlockAdaptive(Strategy):
    name = "block_adaptive"
    dynamic = True
    params = {
        "tau": Param(0.9, check_fraction(), "keep the smallest set of key blocks reaching this estimated mass"),
        "cap": Param(0.25, check_fraction(), "at most this fraction of key blocks chosen by mass (guards excluded)"),
        "topk": Param(None, _check_topk, "keep exactly this many key blocks by mass instead of tau"),
        "min_similarity": Param(0.3, _check_similarity, "self-similarity below which a block is forced on"),
    }

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        (mass, order, mass_before), (forced_keys, dense_rows, own) = estimate(ctx, params["min_similarity"])
        nk = mass.shape[-1]
        rank = torch.arange(nk, device=mass.device)
        by_mass = mass_before < params["tau"] if params["topk"] is None else (rank < params["topk"]).expand_as(mass)
        keep_sorted = by_mass & (rank < max(1, math.ceil(params["cap"] * nk)))
        keep = _unsort(keep_sorted, order)
        keep = keep | forced_keys | dense_rows | own
        return BlockLayout.from_block_mask(keep, ctx.seq_len, ctx.block_q, ctx.block_k)


@register
class Pyramid(Strategy):
    """Each key block gets a level by its mass band: full, pooled x2, x4, x8, or dropped."""

    name = "pyramid"
    dynamic = True
    pooled = True
    params = {
        "bands": Param(
            (0.6, 0.8, 0.9, 0.95), _check_bands,
            "cumulative mass ranked before a block below bands[l] gives level l; past the last band it is dropped",
        ),
        "min_similarity": Param(0.3, _check_similarity,
                                "self-similarity below which a block is kept at full resolution"),
    }

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        (_, order, mass_before), (forced_keys, dense_rows, own) = estimate(ctx, params["min_similarity"])
        bands = torch.tensor(params["bands"], device=mass_before.device, dtype=mass_before.dtype)
        level_sorted = (mass_before.unsqueeze(-1) >= bands).sum(-1)  # len(bands) means dropped
        levels = _unsort(level_sorted, order)
        full = forced_keys | dense_rows | own
        levels = torch.where(full, torch.zeros_like(levels), levels)
        keep = levels < len(params["bands"])
        return BlockLayout.from_block_mask(keep, ctx.seq_len, ctx.block_q, ctx.block_k, levels=levels)
