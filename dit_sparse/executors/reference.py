"""The exact reference: dense scores over every key and every pooled key, with the layout as a mask.

Simple on purpose; the ground truth every other executor is tested against. Memory is O(S^2): tests only.
"""

from __future__ import annotations

import torch

from ..fp8 import executor_inputs
from ..layout import BlockLayout, ln_group_sizes, pool_tokens
from . import Executor, register_executor


def extended_keys(k: torch.Tensor, v: torch.Tensor, max_level: int):
    """Full-resolution and pooled keys/values concatenated along the sequence, and the ln(n) bias per key.

    Returns k_ext, v_ext (B, S_ext, H, D) and bias (S_ext,), with level l occupying its own section.
    """
    seq = k.shape[1]
    if max_level == 0:
        return k, v, torch.zeros(seq, device=k.device)
    ks = [pool_tokens(k, level) for level in range(max_level + 1)]
    vs = [pool_tokens(v, level) for level in range(max_level + 1)]
    bias = torch.cat([ln_group_sizes(seq, level, k.device) for level in range(max_level + 1)])
    return torch.cat(ks, 1), torch.cat(vs, 1), bias


def token_mask(layout: BlockLayout, batch: int, heads: int) -> torch.Tensor:
    """(B, H, S, S_ext) boolean: which full-resolution or pooled keys each query row visits."""
    lay = layout.expand(batch, heads)
    levels = lay.level_map()  # (B, H, NQ, NK), -1 = not visited
    seq = lay.seq_len
    rows = torch.arange(seq, device=levels.device) // lay.block_q
    sections = []
    for level in range(lay.max_level + 1):
        pooled = -(-seq // 2**level)
        key_block = (torch.arange(pooled, device=levels.device) * 2**level) // lay.block_k
        sections.append((levels == level)[:, :, rows][:, :, :, key_block])
    return torch.cat(sections, dim=-1)


def reference_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None, fp8: bool = False):
    """q, k, v: (B, S, H, D). Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32."""
    out_dtype = q.dtype
    q, k, v, scale, lse_shift = executor_inputs(q, k, v, layout.block_q, layout.block_k, scale, fp8)
    q, k, v = q.float(), k.float(), v.float()
    b, s, h, _ = q.shape
    k_ext, v_ext, bias = extended_keys(k, v, layout.max_level)
    scores = torch.einsum("bshd,bthd->bhst", q, k_ext) * scale + bias
    scores = scores.masked_fill(~token_mask(layout, b, h), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhst,bthd->bshd", probs, v_ext)
    return out.to(out_dtype), lse + lse_shift


register_executor(
    Executor(
        name="reference",
        run=reference_attention,
        block_sizes=lambda device, head_dim: (64, 64),
    )
)
