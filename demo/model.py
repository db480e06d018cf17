"""The demo's model: loading it (tiny-shapes falls back to its untrained architecture, with a warning for the page,
when its trained weights are missing or broken) and what the page lets a visitor ask of it (:class:`Limits`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..checks import ArgumentError
from ..models import DTYPES, TINY_SHAPES, call_defaults, load_model, patch_size
from .inputs import DemoError

logger = logging.getLogger(__name__)

CPU_MAX_TOKENS = 4096  # tiny-shapes on the CPU: e.g. 8 frames at 64x32, 16 frames at 32x32
UNTRAINED_WARNING = (
    "The trained tiny-shapes weights are not installed, so this page runs the untrained tiny-shapes architecture: "
    "the videos are noise and the caption check fails, but timings, PSNR/SSIM and the plan work as with the "
    "trained model. Train them with `python tools/train_tiny_shapes.py` in a source checkout."
)


def load_demo_model(model: str, device: str, dtype: str):
    """(pipeline, warning or None). tiny-shapes without its trained weights falls back to the untrained
    architecture, with a warning for the page."""
    if dtype not in DTYPES:
        raise DemoError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DemoError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if model == TINY_SHAPES:
        from ..zoo import load_tiny_shapes
        from ..zoo import pipeline as zoo_pipeline

        if (Path(zoo_pipeline.WEIGHTS_DIR) / "model_index.json").is_file():
            try:
                return load_tiny_shapes(device=device, dtype=DTYPES[dtype]), None
            except Exception as e:  # half-written or broken weights: still show the page, and say why
                logger.warning("could not load the tiny-shapes weights: %s", e)
                warning = (f"The tiny-shapes weights could not be loaded ({type(e).__name__}: {e}); this page runs "
                           "the untrained architecture, so the videos are noise.")
                return _untrained(device, dtype), warning
        logger.warning("tiny-shapes weights not found at %s; using the untrained architecture",
                       zoo_pipeline.WEIGHTS_DIR)
        return _untrained(device, dtype), UNTRAINED_WARNING
    try:
        return load_model(model, device, DTYPES[dtype]), None
    except ArgumentError as e:
        raise DemoError(str(e)) from None


def _untrained(device: str, dtype: str):
    from ..zoo import build_pipeline

    pipe = build_pipeline().to(device)
    return pipe if DTYPES[dtype] == DTYPES["float32"] else pipe.to(dtype=DTYPES[dtype])


def is_tiny_shapes(pipe) -> bool:
    return type(pipe).__name__ == "TinyShapesPipeline"


@dataclass(frozen=True)
class Limits:
    """What the page lets a visitor ask of the model (a CPU-sized range for tiny-shapes)."""

    default_steps: int
    max_steps: int
    default_guidance: float
    max_guidance: float
    multiple: int  # height and width must be multiples of this
    min_side: int
    max_side: int
    default_height: int
    default_width: int
    default_frames: int
    max_frames: int
    spatial_factor: int = 1  # pixels per latent pixel
    temporal_factor: int = 1  # frames per latent frame
    max_tokens: int | None = None  # cap on the transformer's sequence (keeps a CPU run to a minute or so)

    @classmethod
    def for_pipeline(cls, pipe, transformer, device: str = "cpu") -> "Limits":
        d = call_defaults(pipe)
        _, ph, pw = patch_size(transformer)
        if is_tiny_shapes(pipe):
            return cls(default_steps=int(d.get("num_inference_steps") or 20), max_steps=50,
                       default_guidance=float(d.get("guidance_scale") or 4.5), max_guidance=20.0,
                       multiple=max(ph, pw), min_side=8, max_side=64, default_height=int(d.get("height") or 32),
                       default_width=int(d.get("width") or 32), default_frames=int(d.get("num_frames") or 8),
                       max_frames=16, max_tokens=CPU_MAX_TOKENS if device == "cpu" else None)
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
        height = d.get("height") if isinstance(d.get("height"), int) else 480
        width = d.get("width") if isinstance(d.get("width"), int) else 832
        frames = d.get("num_frames") if isinstance(d.get("num_frames"), int) else 1
        steps = d.get("num_inference_steps") if isinstance(d.get("num_inference_steps"), int) else 50
        guidance = d.get("guidance_scale") if isinstance(d.get("guidance_scale"), (int, float)) else 5.0
        return cls(default_steps=steps, max_steps=max(100, steps), default_guidance=float(guidance),
                   max_guidance=20.0, multiple=spatial * max(ph, pw), min_side=spatial * max(ph, pw) * 4,
                   max_side=2 * max(height, width), default_height=height, default_width=width,
                   default_frames=frames, max_frames=max(2 * frames, 1), spatial_factor=spatial,
                   temporal_factor=temporal)

    @property
    def default_resolution(self) -> str:
        return f"{self.default_height}x{self.default_width}"

    def resolutions(self) -> list[str]:
        """A few sizes to pick from (the default, smaller and larger ones, all valid)."""
        out = []
        for scale in (0.5, 0.75, 1.0, 1.5, 2.0):
            h = int(round(self.default_height * scale / self.multiple)) * self.multiple
            w = int(round(self.default_width * scale / self.multiple)) * self.multiple
            if self.min_side <= min(h, w) and max(h, w) <= self.max_side and f"{h}x{w}" not in out:
                out.append(f"{h}x{w}")
        return out
