"""Dense attention that also returns the log-sum-exp, on any device; the baseline every sparse part merges with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dense_attention(q, k, v, key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), key_mask (B, Sk) True = attend. Returns (B, Sq, H, D)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def dense_attention_lse(q, k, v, key_mask: torch.Tensor | None = None, scale: float | None = None):
    """Like dense_attention, plus the LSE (B, H, Sq) in fp32 (natural log, scale included)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        bias = bias[:, None, None, :]
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=bias, scale=scale
        )[:2]
        return out.transpose(1, 2), lse.float()
    if q.device.type == "cuda":
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, False, scale=scale
        )[:2]
        return out.transpose(1, 2), lse[..., : q.shape[1]].float()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exactly combine two softmax-normalised partial attentions over disjoint key sets.

    out_*: (B, S, H, D); lse_*: (B, H, S) fp32. Returns (out, lse) as if both key sets were attended at once.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse
