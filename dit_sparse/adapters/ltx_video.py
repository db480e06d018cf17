"""LTX-Video: video-only self-attention `attn1` with RoPE in the processor; `attn2` is cross-attention.

The transformer gets already patchified tokens (B, S, C); the grid is the forward kwargs num_frames, height, width,
the same numbers the model's own RoPE uses as token coordinates (every released LTX-Video has patch size 1).
Calls that give only `video_coords` (the condition pipeline, whose sequence also holds conditioning tokens) have
no grid and are refused.
"""

from __future__ import annotations

from ..layout import Grid
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class LTXVideoAdapter(ModelAdapter):
    family = "ltx_video"
    transformer_classes = ("LTXVideoTransformer3DModel",)
    covered_pattern = r"transformer_blocks\.(\d+)\.attn1"

    def grid(self, transformer, inputs):
        args = inputs.arguments
        sizes = [args.get(name) for name in ("num_frames", "height", "width")]
        if any(size is None for size in sizes):
            raise ValueError(
                "dit-sparse needs num_frames, height and width in LTXVideoTransformer3DModel's forward (calls "
                "with only video_coords, as in LTXConditionPipeline, are not supported)"
            )
        return Grid(*(int(size) for size in sizes))

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LTX-Video self-attention with encoder states or a mask is not supported by dit-sparse")
        # q/k norms span all heads, and RoPE is applied before splitting heads, as LTXVideoAttnProcessor does.
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if rotary is not None:
            query, key = apply_rotary_emb(query, rotary), apply_rotary_emb(key, rotary)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = attend(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))
