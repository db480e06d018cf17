"""Tiny diffusers transformers built from config with random weights, one per supported family."""

from __future__ import annotations

import torch


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    return model.eval()


def wan_inputs(batch=1, frames=3, height=10, width=14, text=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        return_dict=False,
    )


def tiny_cogvideox(seed: int = 0, patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        sample_width=16, sample_height=12, sample_frames=9, patch_size=2, patch_size_t=patch_size_t,
        text_embed_dim=24, time_embed_dim=16, max_text_seq_length=6, use_rotary_positional_embeddings=True,
    )
    return model.eval()


def cogvideox_inputs(batch=2, frames=3, height=10, width=14, text=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, frames, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline with a tiny transformer and VAE; no text encoder (tests pass prompt embeddings)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tiny_wan(seed), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe


def tiny_cogvideox_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=tiny_cogvideox(seed),
                             scheduler=CogVideoXDDIMScheduler())
    return pipe


# -- the other families: odd token grids (3x5x7 video, 5x7 images) so 16-token blocks are ragged ---------------
def _text_mask(batch, text, padded):
    """(B, text) 1 for real tokens; with `padded`, every sample after the first loses a tail of its prompt."""
    mask = torch.ones(batch, text, dtype=torch.long)
    if padded:
        for i in range(1, batch):
            mask[i, text - 2 * i:] = 0
    return mask


def tiny_hunyuan_video(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
        pooled_projection_dim=8, guidance_embeds=False, rope_axes_dim=(4, 6, 6),
    )
    return model.eval()


def hunyuan_video_inputs(batch=2, frames=3, height=10, width=14, text=6, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        encoder_attention_mask=_text_mask(batch, text, padded),
        pooled_projections=torch.randn(batch, 8, generator=g),
        return_dict=False,
    )


def tiny_ltx_video(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=24,
    )
    return model.eval()


def ltx_video_inputs(batch=2, frames=3, height=5, width=7, text=6, padded=True, seed=1):
    """LTX takes patchified tokens (B, frames * height * width, C) plus the latent grid as keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_attention_mask=_text_mask(batch, text, padded),
        num_frames=frames, height=height, width=width, rope_interpolation_scale=(0.4, 32.0, 32.0),
        return_dict=False,
    )


def tiny_mochi(seed: int = 0):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=24, time_embed_dim=8, max_sequence_length=6,
    )
    return model.eval()


def mochi_inputs(batch=2, frames=3, height=10, width=14, text=6, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_attention_mask=_text_mask(batch, text, padded),
        return_dict=False,
    )


def mochi_attention_modules(model):
    """Mochi has no attn_processors: its attention modules by name."""
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "MochiAttention"}


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def flux_inputs(batch=2, height=5, width=7, text=6, seed=1):
    """Flux takes packed latents (B, height * width, C) and row-major image ids (row, col) per token."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, height * width, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def tiny_sd3(seed: int = 0, dual_attention_layers=(0,)):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=dual_attention_layers, qk_norm="rms_norm",
    )
    return model.eval()


def sd3_inputs(batch=2, height=10, width=14, text=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24, use_additional_conditions=False,
    )
    return model.eval()


def pixart_inputs(batch=2, height=10, width=14, text=6, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
        encoder_attention_mask=_text_mask(batch, text, padded),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
