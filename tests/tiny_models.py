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
