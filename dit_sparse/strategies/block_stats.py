"""Per-block token statistics the dynamic strategies estimate from: each block's mean token and how well that mean
stands for the block (the mean cosine of its tokens to it).

On CUDA a fused Triton kernel reads every token once (``dit_sparse.kernels`` registers it for "cuda"); the PyTorch
version here runs everywhere else and is the twin the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..layout import block_sizes, pool_blocks


@dataclass(frozen=True)
class BlockStats:
    mean: torch.Tensor  # (B, NB, G, D) fp32: mean token of each block (the last one may be ragged)
    similarity: torch.Tensor  # (B, G, NB) fp32: mean cosine between each token of the block and its mean


# Device type -> fused implementation (x (B, S, G, D), block) -> BlockStats.
FUSED: dict[str, Callable[[torch.Tensor, int], BlockStats]] = {}


def register_fused(device_type: str, implementation: Callable[[torch.Tensor, int], BlockStats]) -> None:
    FUSED[device_type] = implementation


def block_stats(x: torch.Tensor, block: int) -> BlockStats:
    """(B, S, G, D) tokens -> their blocks' statistics, with the fastest implementation for x's device."""
    if x.device.type == "cuda" and "cuda" not in FUSED:
        from ..executors import load_optional_kernels

        load_optional_kernels()
    return FUSED.get(x.device.type, torch_block_stats)(x, block)


def torch_block_stats(x: torch.Tensor, block: int) -> BlockStats:
    """The PyTorch version: pads the ragged last block, pools, then cosines (several passes over x)."""
    x = x.float()
    mean = pool_blocks(x, block)
    b, s, g, d = x.shape
    nb = mean.shape[1]
    padded = F.pad(x, (0, 0, 0, 0, 0, nb * block - s)).view(b, nb, block, g, d)
    cos = F.cosine_similarity(padded, mean.unsqueeze(2), dim=-1)  # (B, NB, block, G)
    valid = (torch.arange(nb * block, device=x.device) < s).view(1, nb, block, 1)
    sizes = block_sizes(s, block, x.device).view(1, nb, 1)
    return BlockStats(mean, ((cos * valid).sum(2) / sizes).permute(0, 2, 1))
