"""HunyuanVideo: joint attention with the text last and padded, in double and single blocks.

Double blocks (`transformer_blocks.N.attn`) project video and text with separate weights; single blocks
(`single_transformer_blocks.N.attn`) get video and text as two inputs and project their concatenation with one set
of weights. Both return (video_out, text_out). RoPE covers the video tokens only. Padding comes from the attention
mask the model builds, (B, 1, 1, video + text) True for real tokens, of which only the text part can be False.
Layer indices: double blocks 0..D-1, then single blocks D..D+S-1, in forward order. The token refiner's
self-attention over the prompt is not covered and runs its own processor.
"""

from __future__ import annotations

import torch

from ..site import TextTokens
from . import register_adapter
from .base import LatentGrid, ModelAdapter, project_added_heads, project_heads


def text_key_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int, text_len: int) -> torch.Tensor | None:
    """The text part (B, text_len) of a key mask over [video, text], True for real tokens; None when unmasked.

    attention_mask: bool (B, 1, 1, seq_len) or (B, seq_len) True = attend, or an additive float mask (0 = attend).
    """
    if attention_mask is None:
        return None
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if mask.numel() != batch * seq_len:
        raise ValueError(
            f"HunyuanVideo attention mask of shape {tuple(attention_mask.shape)} is not a key mask over "
            f"{seq_len} tokens"
        )
    mask = mask.reshape(batch, seq_len)
    if not bool(mask[:, : seq_len - text_len].all()):
        raise ValueError("HunyuanVideo attention mask hides video tokens; dit-sparse only supports padded text")
    return mask[:, seq_len - text_len:]


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    covered_pattern = r"(?:transformer_blocks|(?P<second>single_transformer_blocks))\.(?P<layer>\d+)\.attn"

    # (B, C, T, H, W); the model floors frames too (frames // patch_size_t)
    latent_grid = LatentGrid((2, 3, 4), lambda config: (config.patch_size_t, config.patch_size, config.patch_size),
                             ceil_frames=False)

    def stock_processor(self, attn):
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        # Block attentions carry q/k norms; the token refiner's plain attention does not.
        return HunyuanVideoAttnProcessor2_0() if attn.norm_q is not None else AttnProcessor2_0()

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo block attention without text is not supported by dit-sparse")
        text_len = encoder_hidden_states.shape[1]
        double = attn.add_q_proj is not None
        video = hidden_states if double else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = project_heads(attn, video)
        if rotary is not None:
            n_video = hidden_states.shape[1]
            query = torch.cat([apply_rotary_emb(query[:, :n_video], rotary, sequence_dim=1), query[:, n_video:]], 1)
            key = torch.cat([apply_rotary_emb(key[:, :n_video], rotary, sequence_dim=1), key[:, n_video:]], 1)
        if double:
            text_q, text_k, text_v = project_added_heads(attn, encoder_hidden_states)
            query, key, value = (torch.cat(pair, 1) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        b, s = query.shape[:2]
        mask = text_key_mask(attention_mask, b, s, text_len)
        out = attend(query, key, value, text=TextTokens(text_len, first=False, mask=mask))
        out = out.flatten(2, 3).to(query.dtype)
        video_out, text_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out
