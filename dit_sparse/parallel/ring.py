"""Ring: each rank keeps its sequence shard of queries and receives the key/value shards its layouts visit.

Dense ring attention sends every key/value shard to every rank. Under a sparse plan a rank's query blocks visit
only some key blocks, so it needs only the shards that hold them: the need matrix below says, for every pair of
ranks, whether one's queries visit any key of the other's shard. It is computed from the layouts alone, which
every rank of a ring group has alike (static layouts, or dynamic ones estimated from the same gathered q and k), so
no rank has to ask: a shard nobody needs is neither sent nor attended to. Diagonal-heavy video layouts need few
shards (`ring_traffic` counts them).

A rank attends its own query rows against the whole key sequence, where only the needed shards are filled: the
layout is cut to the query blocks that hold its rows (`rows_only`), and the partial results of the shards merge
exactly inside the executor's softmax, whose LSE the text part and re-scaled heads merge with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..layout import BlockLayout, num_blocks
from .topology import split_lengths


@dataclass(frozen=True)
class QueryRows:
    """The query rows whose outputs this rank needs (ring): a slice of the video tokens and one of the text tokens
    (None without text). Other rows of q are filler; what attention writes there is discarded."""

    video: slice
    text: slice | None = None


def shard_slice(lengths: list[int], rank: int) -> slice:
    """The tokens of rank `rank` when ranks hold `lengths` tokens each, in order."""
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def rows_only(layout: BlockLayout, rows: slice) -> BlockLayout:
    """The layout with every query block outside `rows` visiting nothing (count 0): executors skip such blocks."""
    key = ("rows_only", rows.start, rows.stop)
    if key not in layout.memo:
        first, last = rows.start // layout.block_q, num_blocks(rows.stop, layout.block_q)
        count = layout.kv_count.clone()
        count[..., :first] = 0
        count[..., last:] = 0
        cut = BlockLayout(layout.seq_len, layout.block_q, layout.block_k, layout.kv_index, count, layout.kv_level,
                          derived=True)
        # Its work is counted for this rank's rows only: the other rows of a block it shares with a neighbour are
        # computed twice but kept once, and the ranks' counts must add up to the single-device count.
        cut.memo["density"] = layout.density_of_rows(rows)
        layout.memo[key] = cut
    return layout.memo[key]


def need_matrix(layout: BlockLayout, lengths: list[int]) -> torch.Tensor:
    """(size, size) bool, for ranks holding `lengths` tokens each in order: need[dst, src] when a query block holding
    one of dst's rows visits a key of src's shard (any batch element, any head; pooled blocks stand for the same
    tokens as full-resolution ones). Memoised."""
    key = ("ring_need", tuple(lengths))
    if key not in layout.memo:
        seq, bq, bk = layout.seq_len, layout.block_q, layout.block_k
        visited = layout.block_mask().flatten(0, 1).any(0).cpu()  # (NQ, NK)
        ends = torch.tensor(lengths).cumsum(0).unsqueeze(1)
        starts = ends - torch.tensor(lengths).unsqueeze(1)

        def overlaps(block):  # [r, b]: block b (of `block` tokens) overlaps rank r's shard
            first = torch.arange(num_blocks(seq, block)) * block
            last = torch.clamp(first + block, max=seq) - 1
            return (first.unsqueeze(0) < ends) & (last.unsqueeze(0) >= starts)

        q_of_rank, k_of_rank = overlaps(bq).float(), overlaps(bk).float()
        layout.memo[key] = (q_of_rank @ visited.float() @ k_of_rank.T) > 0
    return layout.memo[key]


def exchange(shard: torch.Tensor, need: torch.Tensor, group, rank: int, lengths: list[int],
             dim: int) -> dict[int, torch.Tensor]:
    """Send this rank's shard to every rank that needs it and receive every shard this rank needs (not its own;
    rank i's is lengths[i] long along `dim`): {source rank: its shard}. Point to point, so a shard nobody needs
    never travels."""
    shard = shard.contiguous()
    size = need.shape[0]
    received, ops = {}, []
    for src in range(size):
        if src != rank and bool(need[rank, src]):
            shape = list(shard.shape)
            shape[dim] = lengths[src]
            received[src] = shard.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, received[src], dist.get_global_rank(group, src), group))
    for dst in range(size):
        if dst != rank and bool(need[dst, rank]):
            ops.append(dist.P2POp(dist.isend, shard, dist.get_global_rank(group, dst), group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received


def all_gather(shard: torch.Tensor, group, lengths: list[int], dim: int) -> list[torch.Tensor]:
    """Every rank's shard (lengths[i] long along `dim`; all_gather wants equal sizes, so shorter ones are padded
    for the trip)."""
    longest = max(lengths)
    pad = [0, 0] * (shard.dim() - 1 - dim) + [0, longest - shard.shape[dim]]
    padded = torch.nn.functional.pad(shard, pad) if longest > shard.shape[dim] else shard.contiguous()
    pieces = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(pieces, padded, group=group)
    return [piece.narrow(dim, 0, n) for piece, n in zip(pieces, lengths)]


@dataclass(frozen=True)
class RingTraffic:
    """Key/value shards a ring sends in one attention, against dense ring attention's size * (size - 1)."""

    sent: int
    dense: int

    @property
    def saved(self) -> float:
        return 1.0 - self.sent / self.dense if self.dense else 0.0

    @classmethod
    def of(cls, need: torch.Tensor) -> "RingTraffic":
        """What a need matrix sends: one shard per needed pair of distinct ranks."""
        size = need.shape[0]
        return cls(int(need.sum()) - int(need.diagonal().sum()), size * (size - 1))


def ring_traffic(layouts: list[BlockLayout], size: int) -> RingTraffic:
    """What a module whose heads run `layouts` sends over a ring of `size` ranks (the union of their needs)."""
    need = torch.zeros(size, size, dtype=torch.bool)
    for layout in layouts:
        need |= need_matrix(layout, split_lengths(layout.seq_len, size))
    return RingTraffic.of(need)
