"""SD3 / SD3.5: joint attention `transformer_blocks.N.attn` with the image first and the text after; no RoPE.

SD3.5's dual-attention blocks add `attn2`, a second image-only self-attention with the same processor class; it
is covered too, as plain image self-attention, numbered after the joint attentions: `attn` of block N is layer
N, and the k-th `attn2` (in block order) is layer num_layers + k. The last block is context_pre_only: its text
output is returned without the added output projection, as JointAttnProcessor2_0 does.
"""

from __future__ import annotations

import torch

from ..site import TextTokens
from . import register_adapter
from .base import ImageAdapter, project_added_heads, project_heads


@register_adapter
class SD3Adapter(ImageAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    covered_pattern = r"transformer_blocks\.(?P<layer>\d+)\.(?:attn|(?P<second>attn2))"
    stock_processor_class = "diffusers.models.attention_processor.JointAttnProcessor2_0"

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        if attention_mask is not None:
            raise ValueError("SD3 attention with an attention mask is not supported by dit-sparse")
        b = hidden_states.shape[0]
        # The norms act on the last (head) dimension, so (B, S, H, D) gives what the stock (B, H, S, D) gives.
        query, key, value = project_heads(attn, hidden_states)
        if encoder_hidden_states is None:
            out = attend(query, key, value).reshape(b, -1, attn.heads * self.head_dim(attn)).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        text_q, text_k, text_v = project_added_heads(attn, encoder_hidden_states)
        text_len = text_q.shape[1]
        out = attend(torch.cat([query, text_q], 1), torch.cat([key, text_k], 1), torch.cat([value, text_v], 1),
                     text=TextTokens(text_len, first=False))
        out = out.reshape(b, -1, attn.heads * self.head_dim(attn)).to(query.dtype)
        image_out, text_out = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out
