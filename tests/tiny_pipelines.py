"""The real diffusers pipeline of every supported family, with its tiny transformer from tests/tiny_models.py.

Each builder returns (pipe, call_kwargs): no tokenizer or text encoder (the prompt goes in as embeddings, with the
pooled embeddings and attention masks the pipeline asks for), no VAE where the pipeline runs without one (its
default compression factors then give the latent shape), and call_kwargs for a small generation: STEPS steps,
classifier-free guidance on (both branches run), a latent output, a fixed generator seed. Every latent grid is
3x5x7 tokens for video and 5x7 for images, so 16-token blocks are ragged.

`generate(pipe, call_kwargs)` runs one generation with a fresh generator of the same seed, so repeated calls start
from the same noise. `set_timesteps_kwargs(name, pipe, call_kwargs)` is what that pipeline passes to its scheduler's
`set_timesteps` besides the step count (sigmas, Flux's and LTX's `mu`), computed as the pipeline computes it.
"""

from __future__ import annotations

import numpy as np
import tiny_models as tm
import torch

STEPS = 5
SEED = 3


def _embeds(batch_text_dim, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch_text_dim, generator=g), torch.randn(*batch_text_dim, generator=g)


def _masks(text, padded_negative=True):
    """(1, text) masks: the prompt's all real, the negative prompt's last two tokens padding."""
    mask = torch.ones(1, text, dtype=torch.long)
    neg = mask.clone()
    if padded_negative:
        neg[:, text - 2:] = 0
    return mask, neg


def _common(**kwargs):
    return dict(num_inference_steps=STEPS, output_type="latent", return_dict=False,
                generator=torch.Generator().manual_seed(SEED), **kwargs)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan():
    pipe = tm.tiny_wan_pipeline()
    emb, neg = _embeds((1, 5, 24))
    # AutoencoderKLWan's config factors (8 spatial, 4 temporal): latents (4, 3, 10, 14), tokens 3x5x7.
    return _quiet(pipe), _common(prompt_embeds=emb, negative_prompt_embeds=neg, height=80, width=112, num_frames=9,
                                 guidance_scale=4.0)


def cogvideox():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    # No VAE: the pipeline's defaults (8 spatial, 4 temporal) give latents (3, 4, 10, 14), tokens 3x5x7 (the tiny
    # VAE of tm.tiny_cogvideox_pipeline compresses 2x, and check_inputs wants sizes divisible by 8).
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm.tiny_cogvideox(),
                             scheduler=CogVideoXDDIMScheduler())
    emb, neg = _embeds((1, 6, 24))
    return _quiet(pipe), _common(prompt_embeds=emb, negative_prompt_embeds=neg, height=80, width=112, num_frames=9,
                                 guidance_scale=4.0)


def hunyuan_video():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tm.tiny_hunyuan_video(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    emb, neg = _embeds((1, 6, 24))
    pooled, neg_pooled = _embeds((1, 8), seed=12)
    mask, neg_mask = _masks(6)
    # true_cfg_scale > 1 with negative embeddings: the pipeline runs a "cond" and an "uncond" call per step.
    return _quiet(pipe), _common(
        prompt_embeds=emb, pooled_prompt_embeds=pooled, prompt_attention_mask=mask, negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled, negative_prompt_attention_mask=neg_mask, true_cfg_scale=3.0,
        height=80, width=112, num_frames=9)


def ltx_video():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    # LTX-Video's scheduler config (dynamic shifting: the pipeline passes `mu` from the latent sequence length).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05, shift=1.0,
        shift_terminal=0.1, use_dynamic_shifting=True)
    pipe = LTXPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                       transformer=tm.tiny_ltx_video())
    emb, neg = _embeds((1, 6, 24))
    mask, neg_mask = _masks(6)
    # No VAE: 32 spatial, 8 temporal; 160x224 pixels and 17 frames are latents 3x5x7.
    return _quiet(pipe), _common(
        prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask, height=160, width=224, num_frames=17, guidance_scale=4.0)


def mochi():
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None, text_encoder=None,
                         tokenizer=None, transformer=tm.tiny_mochi())
    emb, neg = _embeds((1, 6, 24))
    mask, neg_mask = _masks(6)
    # 8 spatial, 6 temporal: 80x112 pixels and 13 frames are latents 3x10x14, tokens 3x5x7.
    return _quiet(pipe), _common(
        prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask, height=80, width=112, num_frames=13, guidance_scale=4.0)


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # FLUX.1's scheduler config (dynamic shifting: the pipeline passes `mu` from the image sequence length).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tm.tiny_flux())
    emb, neg = _embeds((1, 6, 24))
    pooled, neg_pooled = _embeds((1, 8), seed=12)
    # 80x112 pixels: latents 10x14, packed 2x2 into 5x7 tokens. true_cfg_scale > 1: "cond" and "uncond" calls.
    return _quiet(pipe), _common(
        prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=3.0, height=80, width=112)


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tm.tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    emb, neg = _embeds((1, 6, 24))
    pooled, neg_pooled = _embeds((1, 8), seed=12)
    return _quiet(pipe), _common(
        prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled, height=80, width=112, guidance_scale=4.0)


def pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm.tiny_pixart(),
                               scheduler=DPMSolverMultistepScheduler())
    emb, neg = _embeds((1, 6, 24))
    mask, neg_mask = _masks(6)
    return _quiet(pipe), _common(
        prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask, height=80, width=112, guidance_scale=4.0,
        use_resolution_binning=False)


def tiny_shapes():
    from dit_sparse.zoo import load_tiny_shapes

    # Pixel space, patch (1, 2, 2): 3 frames of 10x14 pixels are 3x5x7 tokens.
    return _quiet(load_tiny_shapes()), _common(prompt="a red circle moving right", height=10, width=14,
                                               num_frames=3, guidance_scale=4.5)


BUILDERS = {
    "wan": wan, "cogvideox": cogvideox, "hunyuan_video": hunyuan_video, "ltx_video": ltx_video, "mochi": mochi,
    "flux": flux, "sd3": sd3, "pixart": pixart, "tiny_shapes": tiny_shapes,
}
# Pipelines that tell the transformer where the loop is (step_index, num_inference_steps in cache_context).
PASSES_STEP_COUNT = {"wan", "tiny_shapes"}


def generate(pipe, call_kwargs) -> torch.Tensor:
    """One generation; the generator is a fresh one with call_kwargs' seed, so every call starts alike."""
    kwargs = dict(call_kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(call_kwargs["generator"].initial_seed())
    return pipe(**kwargs)[0]


def _calculate_shift(scheduler, seq_len, max_shift=1.15):
    config = scheduler.config
    base_seq, max_seq = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, top_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (top_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + base_shift - m * base_seq


def set_timesteps_kwargs(name: str, pipe, call_kwargs) -> dict:
    """What `name`'s pipeline passes to scheduler.set_timesteps besides the step count, as it computes it."""
    steps = call_kwargs["num_inference_steps"]
    if name == "hunyuan_video":
        return {"sigmas": np.linspace(1.0, 0.0, steps + 1)[:-1]}
    if name == "mochi":
        from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

        return {"sigmas": np.array(linear_quadratic_schedule(steps, 0.025))}
    if name == "flux":
        seq_len = (call_kwargs["height"] // 16) * (call_kwargs["width"] // 16)  # packed latent tokens
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": _calculate_shift(pipe.scheduler, seq_len)}
    if name == "ltx_video":
        frames = (call_kwargs["num_frames"] - 1) // pipe.vae_temporal_compression_ratio + 1
        seq_len = (frames * (call_kwargs["height"] // pipe.vae_spatial_compression_ratio)
                   * (call_kwargs["width"] // pipe.vae_spatial_compression_ratio))
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": _calculate_shift(pipe.scheduler, seq_len)}
    return {}


def transformer_calls(pipe, call_kwargs) -> list[tuple[float, str | None, int | None, int | None]]:
    """(timestep as passed, cache-context name, step_index, num_inference_steps) of every transformer call of one
    stock generation."""
    import contextlib

    transformer = pipe.transformer
    calls, current = [], [None]

    @contextlib.contextmanager
    def cache_context(name, **kwargs):
        current[0] = (name, kwargs.get("step_index"), kwargs.get("num_inference_steps"))
        with type(transformer).cache_context(transformer, name, **kwargs):
            yield
        current[0] = None

    def pre_hook(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        calls.append((float(torch.as_tensor(t).float().flatten()[0]), *(current[0] or (None, None, None))))

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    transformer.cache_context = cache_context
    try:
        generate(pipe, call_kwargs)
    finally:
        handle.remove()
        del transformer.cache_context
    return calls
