"""SD3 / SD3.5: joint attention `transformer_blocks.N.attn` with the image first and the text after; no RoPE.

SD3.5's dual-attention blocks add `attn2`, a second image-only self-attention with the same processor class; it
is covered too, as plain image self-attention, numbered after the joint attentions: `attn` of block N is layer
N, and the k-th `attn2` (in block order) is layer num_layers + k. The last block is context_pre_only: its text
output is returned without the added output projection, as JointAttnProcessor2_0 does.
"""

from __future__ import annotations

import re

import torch

from ..attend import TextTokens
from ..layout import Grid
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class SD3Adapter(ModelAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    covered_pattern = r"transformer_blocks\.(\d+)\.(attn|attn2)"

    def covered_modules(self, transformer):
        joint, dual = [], []
        for name, _ in transformer.named_modules():
            match = re.fullmatch(self.covered_pattern, name)
            if match:
                (joint if match.group(2) == "attn" else dual).append(name)
        offset = len(transformer.transformer_blocks)
        return [(n, int(n.split(".")[1])) for n in joint] + [(n, offset + k) for k, n in enumerate(dual)]

    def grid(self, transformer, inputs):
        _, _, height, width = inputs.arguments["hidden_states"].shape  # (B, C, H, W)
        p = transformer.config.patch_size
        return Grid(1, height // p, width // p)

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return JointAttnProcessor2_0()

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None,
                  **kwargs):
        if attention_mask is not None:
            raise ValueError("SD3 attention with an attention mask is not supported by dit-sparse")
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        key = attn.to_k(hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        value = attn.to_v(hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        # The norms act on the last (head) dimension, so (B, S, H, D) gives what the stock (B, H, S, D) gives.
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:
            out = attend(query, key, value).reshape(b, -1, attn.heads * self.head_dim(attn)).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        text_q = attn.add_q_proj(encoder_hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        text_k = attn.add_k_proj(encoder_hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        text_v = attn.add_v_proj(encoder_hidden_states).view(b, -1, attn.heads, self.head_dim(attn))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        text_len = text_q.shape[1]
        out = attend(torch.cat([query, text_q], 1), torch.cat([key, text_k], 1), torch.cat([value, text_v], 1),
                     text=TextTokens(text_len, first=False))
        out = out.reshape(b, -1, attn.heads * self.head_dim(attn)).to(query.dtype)
        image_out, text_out = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out
