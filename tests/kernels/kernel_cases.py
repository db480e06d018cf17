"""Shared inputs for the kernel tests: random q, k, v and random block layouts (ragged, levels, broadcast)."""

from __future__ import annotations

import torch

from dit_sparse.layout import BlockLayout, num_blocks, own_block_mask


def qkv(batch, seq, heads, dim, *, device="cpu", dtype=torch.float32, seed=0, k_offset=0.0):
    """(B, S, H, D) q, k, v with unit-variance entries; ``k_offset`` adds a shared per-channel key mean."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))
    if k_offset:
        k = k + k_offset * torch.randn(1, 1, heads, dim, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def random_layout(seq, block_q, block_k, *, batch=1, heads=1, density=0.5, levels=False, seed=0, device="cpu"):
    """A random layout with the diagonal blocks always on; with ``levels`` random levels 0..3."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    mask = torch.rand(batch, heads, nq, nk, generator=g) < density
    mask |= own_block_mask(seq, block_q, block_k)
    lv = torch.randint(0, 4, (batch, heads, nq, nk), generator=g) if levels else None
    if lv is not None:
        lv[..., 0] = 3  # the first key block pooled at x8: its 8-row segments test short tiles
    layout = BlockLayout.from_block_mask(mask, seq, block_q, block_k, levels=lv)
    return to_device(layout, device)


def to_device(layout: BlockLayout, device) -> BlockLayout:
    level = None if layout.kv_level is None else layout.kv_level.to(device)
    return BlockLayout(layout.seq_len, layout.block_q, layout.block_k, layout.kv_index.to(device),
                       layout.kv_count.to(device), level)


def nan_like(x, shape=None, dtype=None):
    """An output buffer filled with NaN, so any element a kernel leaves unwritten fails the comparison."""
    return torch.full(shape or x.shape, float("nan"), dtype=dtype or x.dtype, device=x.device)


def nan_past_end(x):
    """x (B, S, H, D) as a view of a longer buffer whose rows past S are NaN: a kernel that reads a tile past S
    without a mask poisons its output (descriptor loads stop at S by their bounds)."""
    b, s, h, d = x.shape
    buf = torch.full((b, s + 160, h, d), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, :s] = x
    return buf[:, :s]
