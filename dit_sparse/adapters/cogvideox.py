"""CogVideoX and CogVideoX 1.5: joint attention with the text first, RoPE on the video part only."""

from __future__ import annotations

import torch

from ..site import TextTokens
from . import register_adapter
from .base import LatentGrid, ModelAdapter


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    covered_pattern = r"transformer_blocks\.(\d+)\.attn1"
    # (B, F, C, H, W)
    latent_grid = LatentGrid((1, 3, 4), lambda config: (config.patch_size_t or 1, config.patch_size, config.patch_size))

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import AttnProcessor2_0, CogVideoXAttnProcessor2_0

        return CogVideoXAttnProcessor2_0() if attn.is_cross_attention is False and hasattr(attn, "norm_q") \
            else AttnProcessor2_0()

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("CogVideoX self-attention with an attention mask is not supported by dit-sparse")
        text_len = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = joint.shape[0]
        query = attn.to_q(joint).view(b, -1, attn.heads, self.head_dim(attn)).transpose(1, 2)
        key = attn.to_k(joint).view(b, -1, attn.heads, self.head_dim(attn)).transpose(1, 2)
        value = attn.to_v(joint).view(b, -1, attn.heads, self.head_dim(attn))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary)
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value, text=TextTokens(text_len, first=True))
        out = attn.to_out[1](attn.to_out[0](out.reshape(b, -1, attn.heads * self.head_dim(attn))))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out

