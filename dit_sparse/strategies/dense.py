"""`dense` visits every block; `skip` computes nothing and the head's output is zero."""

from __future__ import annotations

import torch

from ..layout import BlockLayout, num_blocks
from . import register
from .base import BuildContext, Strategy


def full_layout(seq_len: int, block_q: int, block_k: int, device=None) -> BlockLayout:
    nq, nk = num_blocks(seq_len, block_q), num_blocks(seq_len, block_k)
    index = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
    count = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    return BlockLayout(seq_len, block_q, block_k, index, count)


@register
class Dense(Strategy):
    name = "dense"

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        return full_layout(ctx.seq_len, ctx.block_q, ctx.block_k)


@register
class Skip(Strategy):
    name = "skip"
    computes = False

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        raise RuntimeError("`skip` has no layout: its output is zero")
