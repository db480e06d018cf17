"""PixArt-alpha / sigma: image-only self-attention `attn1` (AttnProcessor2_0), row-major tokens, no RoPE.

`attn2` is cross-attention to the text and runs its own processor.
"""

from __future__ import annotations

from . import register_adapter
from .base import ImageAdapter, project_heads


@register_adapter
class PixArtAdapter(ImageAdapter):
    family = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    covered_pattern = r"transformer_blocks\.(\d+)\.attn1"


    def output_follows_attention(self, attn):
        return not attn.residual_connection  # the module adds its own input to the output

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("PixArt self-attention with encoder states, a mask or 4-D inputs is not supported by "
                             "dit-sparse")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("PixArt self-attention with spatial or group norm is not supported by dit-sparse")
        residual = hidden_states
        b = hidden_states.shape[0]
        query, key, value = project_heads(attn, hidden_states)
        out = attend(query, key, value).reshape(b, -1, attn.heads * self.head_dim(attn)).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
