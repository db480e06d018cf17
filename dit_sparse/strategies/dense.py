"""`dense` visits every block; `skip` computes nothing and the head's output is zero; `reuse` runs dense at refresh
steps and reuses that output at the steps between."""

from __future__ import annotations

import torch

from ..layout import BlockLayout, num_blocks
from . import register
from .base import BuildContext, Param, Strategy, check_bool


def check_order(value):
    return None if value in (1, 2) and not isinstance(value, bool) else f"must be 1 or 2, got {value!r}"


def full_layout(seq_len: int, block_q: int, block_k: int, device=None) -> BlockLayout:
    nq, nk = num_blocks(seq_len, block_q), num_blocks(seq_len, block_k)
    index = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
    count = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    return BlockLayout(seq_len, block_q, block_k, index, count)


@register
class Dense(Strategy):
    name = "dense"
    dense = True

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        return full_layout(ctx.seq_len, ctx.block_q, ctx.block_k)


@register
class Skip(Strategy):
    name = "skip"
    computes = False

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        raise RuntimeError("`skip` has no layout: its output is zero")


@register
class Reuse(Strategy):
    """Attention outputs change little from one denoising step to the next (the idea of attention sharing across
    timesteps in DiTFastAttn and of feature caching): the head runs dense at a refresh step (the first sparse step,
    then every `schedule.refresh_interval` steps) and its output, text keys included, is reused at the steps
    between, where nothing runs. With `extrapolate` (the default) the reused output follows the line through the
    last two computed outputs, a first-order forecast in the spirit of TaylorSeer-style feature caching; `order` 2
    adds TaylorSeer's second-order term (the second divided difference of the last three computed outputs)."""

    name = "reuse"
    computes = False
    reuses = True
    params = {
        "extrapolate": Param(True, check_bool, "between refreshes, extend the change from the previous refresh (or "
                                                "the last dense step) linearly in steps instead of holding the output"),
        "order": Param(1, check_order, "with `extrapolate`: 1 follows the line through the last two computed "
                                       "outputs, 2 adds the second-order Taylor term from the last three"),
    }

    def layout(self, params, ctx: BuildContext) -> BlockLayout:
        return full_layout(ctx.seq_len, ctx.block_q, ctx.block_k)
