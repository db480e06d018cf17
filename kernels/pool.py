"""Pooled keys and values for pyramid levels, built on the host with the layout helpers.

The pooled tensor is levels 1..L concatenated along the sequence (level l: ceil(S / 2**l) rows), matching the
row numbering of ``segments.pooled_segments``. Pooling runs in fp32 so that bf16 inputs do not lose the sum.
"""

from __future__ import annotations

import torch

from dit_sparse.layout import ln_group_sizes, pool_tokens

from .fwd_kernel import LOG2E


def pooled_kv(k: torch.Tensor, v: torch.Tensor, max_level: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> pooled k, v (B, S_pool, H, D) contiguous in ``dtype`` (default: k's dtype)."""
    dtype = dtype or k.dtype
    kf, vf = k.float(), v.float()
    kp = torch.cat([pool_tokens(kf, level) for level in range(1, max_level + 1)], 1)
    vp = torch.cat([pool_tokens(vf, level) for level in range(1, max_level + 1)], 1)
    return kp.to(dtype).contiguous(), vp.to(dtype).contiguous()


def pooled_bias(seq_len: int, max_level: int, device) -> torch.Tensor:
    """(S_pool,) fp32: ln(tokens each pooled key stands for), in log2 units as the kernel's softmax uses."""
    return torch.cat([ln_group_sizes(seq_len, level, device) for level in range(1, max_level + 1)]) * LOG2E
