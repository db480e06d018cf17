"""Mochi: joint attention with the text last; RoPE on the video q/k only; padded text dropped per sample.

MochiAttnProcessor2_0 attends, per sample, over the video tokens and the real (unmasked) text tokens only, then
packs the real text rows first and zero-fills the rest. Here padded text keys are masked instead (the same result)
and the text rows are packed the same way. MochiAttention has no set_processor and Mochi no set_attn_processor:
`apply` assigns `module.processor`.
"""

from __future__ import annotations

import torch

from ..site import TextTokens
from . import register_adapter
from .base import LatentGrid, ModelAdapter, project_added_heads, project_heads


def apply_mochi_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's interleaved RoPE on (B, S, H, D) with cos/sin (S, H, D/2), as MochiAttnProcessor2_0 does it."""
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def pack_real_text(text_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """text_out (B, T, C), mask (B, T) True = real: real rows first in order, zeros after (the stock layout)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    packed = text_out.gather(1, order.unsqueeze(-1).expand_as(text_out))
    keep = torch.arange(mask.shape[1], device=mask.device) < mask.sum(1, keepdim=True)
    return packed * keep.unsqueeze(-1).to(packed.dtype)


@register_adapter
class MochiAdapter(ModelAdapter):
    family = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    # MochiPipeline's scheduler inverts sigmas: the timesteps it passes rise from 0 (pure noise) to 1000.
    timestep_rises = True
    covered_pattern = r"transformer_blocks\.(\d+)\.attn1"

    latent_grid = LatentGrid((2, 3, 4))  # (B, C, T, H, W)
    stock_processor_class = "diffusers.models.attention_processor.MochiAttnProcessor2_0"

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        query, key, value = project_heads(attn, hidden_states)
        text_q, text_k, text_v = project_added_heads(attn, encoder_hidden_states)
        if rotary is not None:
            query, key = apply_mochi_rotary(query, *rotary), apply_mochi_rotary(key, *rotary)
        n_video, text_len = query.shape[1], text_q.shape[1]
        mask = None
        if attention_mask is not None:
            mask = attention_mask.reshape(query.shape[0], text_len).bool()
        out = attend(torch.cat([query, text_q], 1), torch.cat([key, text_k], 1), torch.cat([value, text_v], 1),
                     text=TextTokens(text_len, first=False, mask=mask))
        out = out.flatten(2, 3)
        video_out, text_out = out.split_with_sizes((n_video, text_len), dim=1)
        if mask is not None:
            text_out = pack_real_text(text_out, mask)
        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out
