"""`vertical_stripe`: a fixed set of key columns every query sees, plus each query's own token."""

from __future__ import annotations

import torch

from ..layout import BlockLayout, num_blocks, own_block_mask
from . import register
from .base import BuildContext, Param, Strategy, check_nonneg_int


def _check_columns(value):
    if not isinstance(value, (list, tuple)):
        return f"must be a list of token indices, got {value!r}"
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in value):
        return "token indices must be non-negative integers"
    return None


@register
class VerticalStripe(Strategy):
    name = "vertical_stripe"
    params = {
        "first_frames": Param(1, check_nonneg_int, "every token of the first N frames is a column"),
        "sinks": Param(0, check_nonneg_int, "the first N tokens of the sequence are columns"),
        "columns": Param((), _check_columns, "token indices chosen at calibration (ignored past the sequence)"),
    }

    def column_tokens(self, params, ctx: BuildContext) -> torch.Tensor:
        g = ctx.grid
        seq = g.num_tokens
        chosen = torch.zeros(seq, dtype=torch.bool)
        chosen[: min(params["first_frames"], g.frames) * g.height * g.width] = True
        chosen[: min(params["sinks"], seq)] = True
        cols = torch.tensor([c for c in params["columns"] if c < seq], dtype=torch.long)
        chosen[cols] = True
        return chosen

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        seq = ctx.seq_len
        nq, nk = num_blocks(seq, ctx.block_q), num_blocks(seq, ctx.block_k)
        chosen = torch.nn.functional.pad(self.column_tokens(params, ctx), (0, nk * ctx.block_k - seq))
        column_blocks = chosen.view(nk, ctx.block_k).any(-1)
        # A query's own token keeps every row non-empty.
        mask = own_block_mask(seq, ctx.block_q, ctx.block_k) | column_blocks.unsqueeze(0)
        return BlockLayout.from_block_mask(mask.view(1, 1, nq, nk), seq, ctx.block_q, ctx.block_k)
