"""TinyShapesPipeline: text-to-video in pixel space with a WanTransformer3DModel, like diffusers' WanPipeline.

The two classifier-free-guidance branches are separate transformer calls inside
``transformer.cache_context("cond")`` and ``transformer.cache_context("uncond")`` (as WanPipeline does), so
hooks and attention processors can tell the branches apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from . import transformer as _coordinate_transformer  # noqa: F401 (diffusers loads only imported modules)
from .model import MAX_TEXT_LEN, encode_text

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
DEFAULT_HEIGHT = 32
DEFAULT_WIDTH = 32
DEFAULT_FRAMES = 8
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "tiny-shapes"


@dataclass
class TinyShapesPipelineOutput(BaseOutput):
    """``frames``: np.ndarray (B, T, H, W, 3) in [0, 1] for output_type "np", a tensor (B, T, 3, H, W) for "pt",
    lists of PIL images for "pil", or the raw sample (B, 3, T, H, W) in [-1, 1] for "latent"."""

    frames: Any


class TinyShapesPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, tokenizer, text_encoder, transformer: WanTransformer3DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)
        p = self.transformer.config.patch_size if transformer is not None else (1, 2, 2)
        self.patch_size = tuple(p)
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, then every tensor copied into freshly allocated memory: tensors loaded from safetensors
        can sit at addresses that change which SIMD kernels CPU matmuls pick (and so the summation order), and the
        saved copy of a pipeline must generate bit for bit what the original did."""
        pipe = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for module in (pipe.transformer, pipe.text_encoder):
                for t in [*module.parameters(), *module.buffers()]:
                    t.data = t.data.clone()
        return pipe

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True,
                      num_videos_per_prompt: int = 1, max_sequence_length: int = MAX_TEXT_LEN, device=None,
                      dtype=None):
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        pe = encode_text(self.tokenizer, self.text_encoder, prompt, max_sequence_length, device, dtype)
        pe = pe.repeat_interleave(num_videos_per_prompt, dim=0)
        ne = None
        if do_classifier_free_guidance:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * len(prompt) if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != len(prompt):
                raise ValueError("negative_prompt must have as many entries as prompt")
            ne = encode_text(self.tokenizer, self.text_encoder, list(negative_prompt), max_sequence_length, device,
                             dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        return pe, ne

    def check_inputs(self, prompt, height, width, num_frames, num_inference_steps, prompt_embeds):
        if prompt is None and prompt_embeds is None:
            raise ValueError("give either prompt or prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt)}")
        _, ph, pw = self.patch_size
        if height <= 0 or width <= 0 or height % ph or width % pw:
            raise ValueError(f"height and width must be positive multiples of the patch size {ph}x{pw}, "
                             f"got {height}x{width}")
        if num_frames <= 0:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_inference_steps is None or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = DEFAULT_HEIGHT,
        width: int = DEFAULT_WIDTH,
        num_frames: int = DEFAULT_FRAMES,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_TEXT_LEN,
        guidance_interval: tuple[float, float] | None = None,
    ):
        """``guidance_interval=(lo, hi)`` applies classifier-free guidance only at steps whose noise level sigma
        lies in ``[lo, hi]`` and runs the conditional branch alone elsewhere (guidance in a limited interval,
        Kynkaenniemi et al. 2024); ``None`` guides every step."""
        self.check_inputs(prompt, height, width, num_frames, num_inference_steps, prompt_embeds)
        if guidance_interval is not None:
            check_guidance_interval(guidance_interval)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        tdtype = self.transformer.dtype

        if prompt_embeds is None:
            prompt_embeds, ne = self.encode_prompt(
                prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt,
                max_sequence_length, device, tdtype)
            negative_prompt_embeds = negative_prompt_embeds if negative_prompt_embeds is not None else ne
        elif self.do_classifier_free_guidance and negative_prompt_embeds is None:
            _, negative_prompt_embeds = self.encode_prompt(
                [""] * (prompt_embeds.shape[0] // num_videos_per_prompt), None, True, num_videos_per_prompt,
                max_sequence_length, device, tdtype)
        prompt_embeds = prompt_embeds.to(device, tdtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, tdtype)
        batch = prompt_embeds.shape[0]

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        shape = (batch, self.transformer.config.out_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device, torch.float32)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                x = latents.to(tdtype)
                timestep = t.expand(batch)
                # Where the loop is, as WanPipeline tells it (plans counted in steps read it).
                where = {"step_index": i, "num_inference_steps": len(timesteps),
                         "sigma": float(self.scheduler.sigmas[i])}
                with self.transformer.cache_context("cond", **where):
                    pred = self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds,
                                            attention_kwargs=attention_kwargs, return_dict=False)[0]
                if self.do_classifier_free_guidance and guided_at(float(self.scheduler.sigmas[i]), guidance_interval):
                    with self.transformer.cache_context("uncond", **where):
                        pred_u = self.transformer(hidden_states=x, timestep=timestep,
                                                  encoder_hidden_states=negative_prompt_embeds,
                                                  attention_kwargs=attention_kwargs, return_dict=False)[0]
                    pred = pred_u + guidance_scale * (pred - pred_u)
                latents = self.scheduler.step(pred.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(latents.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return TinyShapesPipelineOutput(frames=video)


def check_guidance_interval(interval: tuple[float, float]) -> None:
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(interval)}")


def guided_at(sigma: float, interval: tuple[float, float] | None) -> bool:
    return interval is None or interval[0] <= sigma <= interval[1]


def load_tiny_shapes(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     path: str | Path | None = None) -> TinyShapesPipeline:
    """Load the shipped tiny-shapes weights from the package folder (never the network)."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"tiny-shapes weights not found at {path}; produce them with `python tools/train_tiny_shapes.py` in a "
            "source checkout of dit-sparse")
    pipe = TinyShapesPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return pipe.to(device)


def weights_id(path: str | Path | None = None) -> str:
    """Short content hash of a saved tiny-shapes pipeline's weights (transformer + text encoder).

    Results measured on the model record it, so a result taken on earlier weights can be recognised as stale.
    """
    import hashlib

    path = Path(path) if path is not None else WEIGHTS_DIR
    h = hashlib.sha256()
    for part in sorted(path.glob("*/*.safetensors")):
        h.update(part.read_bytes())
    return h.hexdigest()[:12]
