"""Fused block statistics for mask estimation: per block of tokens, the mean token and the mean cosine of the
block's tokens to it, in one read of q or k (the PyTorch twin, ``torch_block_stats``, pads, pools and takes cosines
in several passes over fp32 copies; that cost 18.6% of a dense attention at 32K tokens on an H200).

One program handles one (block, batch x head): it loads the block's tokens as fp32, sums them to the mean, then
takes each token's cosine to that mean from the same registers. Rows past the sequence are masked out; a ragged
last block is divided by its own size. Registered for "cuda" in ``dit_sparse.strategies.block_stats``.
"""

from __future__ import annotations

import torch

from dit_sparse.layout import num_blocks
from dit_sparse.strategies.block_stats import BlockStats, register_fused

from ._triton import LazyKernel, tl, triton

EPS = tl.constexpr(1e-8)  # torch.nn.functional.cosine_similarity's: each norm is clamped to at least this


def _block_stats(
    X, MEAN, SIM,
    sxb, sxs, sxg, sxd,
    S, G, D, NB,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    nb = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    first = nb.to(tl.int64) * BLOCK
    offs = tl.arange(0, ROWS)
    rows = first + offs
    cols = tl.arange(0, COLS)
    row_ok = (offs < BLOCK) & (rows < S)
    col_ok = cols < D
    ptrs = X + b.to(tl.int64) * sxb + rows[:, None] * sxs + g.to(tl.int64) * sxg + cols[None, :] * sxd
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    size = tl.minimum(S - first, BLOCK).to(tl.float32)
    mean = tl.sum(x, 0) / size
    tl.store(MEAN + ((b.to(tl.int64) * NB + nb) * G + g) * D + cols, mean, mask=col_ok)
    x_norm = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), EPS)
    mean_norm = tl.maximum(tl.sqrt(tl.sum(mean * mean, 0)), EPS)
    cos = tl.sum(x * mean[None, :], 1) / (x_norm * mean_norm)
    cos = tl.where(row_ok, cos, 0.0)
    tl.store(SIM + (b.to(tl.int64) * G + g) * NB + nb, tl.sum(cos, 0) / size)


block_stats_kernel = LazyKernel(_block_stats)


def fused_block_stats(x: torch.Tensor, block: int) -> BlockStats:
    """(B, S, G, D) tokens, any strides and float dtype -> BlockStats (fp32), one kernel launch."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"block statistics take float (B, S, G, D) tokens, got {tuple(x.shape)} {x.dtype}")
    if block < 1:
        raise ValueError(f"block must be a positive number of tokens, got {block}")
    b, s, g, d = x.shape
    nb = num_blocks(s, block)
    stats = BlockStats(torch.empty(b, nb, g, d, device=x.device, dtype=torch.float32),
                       torch.empty(b, g, nb, device=x.device, dtype=torch.float32))
    launch_block_stats(x, block, stats)
    return stats


def launch_block_stats(x: torch.Tensor, block: int, out: BlockStats) -> None:
    """Write the statistics into ``out``'s fp32 buffers (tests pass NaN-filled ones)."""
    b, s, g, d = x.shape
    nb = out.mean.shape[1]
    rows, cols = triton.next_power_of_2(block), triton.next_power_of_2(d)
    # One fp32 tile of rows x cols lives in registers: 8 warps from 128 x 128 (64 values per thread) up.
    warps = 8 if rows * cols >= 128 * 128 else 4
    block_stats_kernel[(nb, b * g)](
        x, out.mean, out.similarity, *x.stride(), s, g, d, nb, BLOCK=block, ROWS=rows, COLS=cols, num_warps=warps,
    )


register_fused("cuda", fused_block_stats)
