"""Host-side preparation of a BlockLayout for the kernels (pure PyTorch, any device).

Three look-up tables, each computed once per layout object (``cached``):

- ``level0_lut``: the full-resolution key blocks per query block, ascending. The forward and dq kernels walk it
  as one flat loop over key tiles (each block id loaded one tile ahead), which Triton pipelines well; the
  ascending order puts the ragged last key block, if visited, at the end, where the kernels peel it off.
- ``pooled_segments``: the pooled entries as row ranges of the pooled key tensor (levels 1..L concatenated,
  the order of ``reference.extended_keys`` without the first S rows). A key block j at level l covers pooled
  rows [j * bk / 2**l, min((j + 1) * bk / 2**l, ceil(S / 2**l))) of its level; runs of adjacent blocks at
  one level are merged into one segment, so short pooled blocks do not each waste a partly empty tile.
- ``transposed_lut``: the query blocks visiting each key block, for the dk/dv backward kernel.

Shapes stay static (the layout's width) apart from ``transposed_lut``'s width.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from dit_sparse.layout import BlockLayout, num_blocks


@dataclass(frozen=True, eq=False)
class Segments:
    """Row segments per (batch, head, block).

    start, length: (B', H', N, K) int32, merged runs first, entries past ``count`` are 0.
    count: (B', H', N) int32. B' and H' may be 1: the launchers broadcast them with stride 0.
    """

    start: torch.Tensor
    length: torch.Tensor
    count: torch.Tensor


def level_offsets(seq_len: int, max_level: int) -> list[int]:
    """First extended row of each level 0..max_level."""
    offsets, row = [], 0
    for level in range(max_level + 1):
        offsets.append(row)
        row += num_blocks(seq_len, 2**level)
    return offsets


def merge_runs(start: torch.Tensor, length: torch.Tensor, valid: torch.Tensor) -> Segments:
    """Merge entries (..., K) whose row ranges are contiguous with the previous valid entry.

    start, length: (..., K) long; valid: (..., K) bool with the valid entries first. Returns int32 Segments.
    """
    k = start.shape[-1]
    touches = torch.zeros_like(valid)
    touches[..., 1:] = valid[..., 1:] & (start[..., 1:] == start[..., :-1] + length[..., :-1])
    first = valid & ~touches
    run = first.long().cumsum(-1) - 1
    # Invalid entries go to a spare column k that is cut off afterwards.
    target = torch.where(valid, run, torch.full_like(run, k))
    spare = start.new_zeros(start.shape[:-1] + (k + 1,))
    seg_start = spare.clone().scatter_(-1, torch.where(first, run, torch.full_like(run, k)), start)
    seg_len = spare.scatter_add(-1, target, torch.where(valid, length, torch.zeros_like(length)))
    count = first.sum(-1)
    return Segments(seg_start[..., :k].to(torch.int32).contiguous(), seg_len[..., :k].to(torch.int32).contiguous(),
                    count.to(torch.int32).contiguous())


def level0_lut(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-resolution entries of a layout: (index (B', H', NQ, K) int32 ascending, count (B', H', NQ) int32).

    A layout without levels is returned as is (no host work); otherwise level-0 entries are moved to the front.
    """
    if layout.kv_level is None:
        return layout.kv_index, layout.kv_count
    k = layout.kv_index.shape[-1]
    valid = torch.arange(k, device=layout.kv_index.device) < layout.kv_count.long().unsqueeze(-1)
    full = valid & (layout.kv_level == 0)
    # Stable sort keeps the chosen entries ascending.
    order = torch.sort((~full).to(torch.int8), dim=-1, stable=True).indices
    index = torch.where(full.gather(-1, order), layout.kv_index.gather(-1, order), 0)
    return index.to(torch.int32).contiguous(), full.sum(-1).to(torch.int32).contiguous()


def pooled_segments(layout: BlockLayout) -> Segments:
    """Segments of the pooled entries per (batch, head, query block), in rows of the pooled key tensor.

    The pooled key tensor is levels 1..max_level concatenated (level l: ceil(S / 2**l) rows), i.e. the extended
    sequence without its first S rows. Runs of adjacent blocks at the same level become one segment.
    """
    seq, bk = layout.seq_len, layout.block_k
    max_level = layout.max_level
    index = layout.kv_index.long()
    device = index.device
    levels = torch.zeros_like(index) if layout.kv_level is None else layout.kv_level.long()
    offsets = torch.tensor(level_offsets(seq, max_level), device=device) - seq
    rows = torch.tensor([num_blocks(seq, 2**lv) for lv in range(max_level + 1)], device=device)
    per_block = bk >> levels
    first_row = index * per_block
    start = offsets[levels] + first_row
    length = torch.minimum(per_block, rows[levels] - first_row).clamp_min(0)
    valid = torch.arange(index.shape[-1], device=device) < layout.kv_count.long().unsqueeze(-1)
    valid &= levels > 0
    # Order pooled entries by row so that adjacent blocks of one level sit next to each other.
    key = torch.where(valid, start, torch.full_like(start, torch.iinfo(torch.int64).max))
    order = key.sort(-1).indices
    return merge_runs(start.gather(-1, order), length.gather(-1, order), valid.gather(-1, order))


def transposed_lut(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Which query blocks visit each key block (level-0 layouts): (index (B', H', NK, W) int32, count (B', H', NK)).

    A key block no query block visits gets count 0 (its dk and dv are zero).
    """
    mask = layout.block_mask().transpose(-1, -2)  # (B', H', NK, NQ)
    count = mask.sum(-1)
    width = max(int(count.max()), 1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=mask.device) < count.unsqueeze(-1)
    index = torch.where(valid, order, 0)
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


_CACHE: "weakref.WeakKeyDictionary[BlockLayout, dict]" = weakref.WeakKeyDictionary()


_BUILDERS = {"level0": level0_lut, "pooled": pooled_segments, "transposed": transposed_lut}


def cached(layout: BlockLayout, kind: str):
    """``level0_lut``, ``pooled_segments`` or ``transposed_lut`` of a layout, computed once per layout object.

    Static layouts are reused across steps and calls, so their host-side preparation is paid once.
    """
    entry = _CACHE.setdefault(layout, {})
    if kind not in entry:
        entry[kind] = _BUILDERS[kind](layout)
    return entry[kind]
