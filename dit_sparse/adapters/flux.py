"""Flux: joint attention with the text first, row-major image tokens, RoPE on text and image alike.

Double blocks (`transformer_blocks.N.attn`) project image and text with separate weights and return
(image_out, text_out); single blocks (`single_transformer_blocks.N.attn`) receive the concatenated [text, image]
sequence with no encoder states and return it whole, without an output projection. Layer indices: double blocks
0..D-1, then single blocks D..D+S-1, in forward order. The grid comes from `img_ids` (row, column ids of a single
image); inputs whose ids do not form one rectangle (e.g. Kontext's reference image tokens) are refused.
"""

from __future__ import annotations

import torch

from ..layout import Grid
from ..site import TextTokens
from . import register_adapter
from .base import ModelAdapter


def grid_from_ids(img_ids: torch.Tensor) -> Grid:
    """img_ids (N, 3) or (B, N, 3) of (index, row, col) per image token, row-major -> Grid(1, rows, cols)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rows = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    cols = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    if rows * cols != ids.shape[0] or int(ids[:, 0].max() - ids[:, 0].min()) != 0:
        raise ValueError(
            f"Flux img_ids with {ids.shape[0]} tokens do not form one {rows}x{cols} image; dit-sparse supports a "
            f"single image grid"
        )
    return Grid(1, rows, cols)


@register_adapter
class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    # FluxPipeline passes timestep / 1000: a noise level already.
    timestep_at_pure_noise = 1.0
    covered_pattern = r"(?:transformer_blocks|(?P<second>single_transformer_blocks))\.(?P<layer>\d+)\.attn"
    stock_processor_class = "diffusers.models.transformers.transformer_flux.FluxAttnProcessor"

    def grid(self, transformer, inputs):
        img_ids = inputs.arguments.get("img_ids")
        if img_ids is None:
            raise ValueError("dit-sparse needs img_ids in FluxTransformer2DModel's forward to know the image grid")
        return grid_from_ids(img_ids)

    @staticmethod
    def _projections(attn, hidden_states, encoder_hidden_states):
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            text = None
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            return (query, key, value), text
        image = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        text = None
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states))
        return image, text

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("Flux attention with an attention mask is not supported by dit-sparse")
        (query, key, value), text = self._projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if text is not None:
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in text)
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, 1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
            text_len = text_q.shape[1]
        else:
            # Single block: [text, image] in one sequence; everything before the image tokens is text.
            text_len = tokens.text_length(query.shape[1])
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        out = attend(query, key, value, text=TextTokens(text_len, first=True)).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())
