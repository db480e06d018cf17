"""What a run at a size asks of the machine (tokens, dense attention memory and time), estimated before it starts,
and the refusal of a size too large for the device."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .checks import ArgumentError
from .models import call_defaults, patch_size

logger = logging.getLogger(__name__)


# Above this many video tokens a CPU run takes hours (attention grows with the square of the tokens); --force runs it.
CPU_MAX_TOKENS = 65536


# Rough attention throughput for the time estimate printed with a refusal (FLOP/s).
ATTENTION_FLOPS = {"cpu": 2e10, "cuda": 2e14}


@dataclass(frozen=True)
class Workload:
    """What a run at a size asks of the machine, estimated before it starts."""

    tokens: int  # video tokens per sequence (latent frames x rows x columns after patching)
    grid: tuple[int, int, int]
    scores_bytes: int  # dense attention scores of one layer if materialized: batch x heads x tokens^2 x 4 bytes
    seconds: float  # dense attention work of the whole run at ATTENTION_FLOPS
    size: tuple[int, int, int]  # frames, height, width in pixels

    def describe(self) -> str:
        f, h, w = self.size
        return (f"{f} frame{'s' * (f != 1)} of {h}x{w} px is {self.tokens:,} video tokens (grid "
                f"{'x'.join(map(str, self.grid))}): dense attention scores take about {_bytes(self.scores_bytes)} "
                f"per layer (batch x heads x tokens^2 x 4 bytes) and the run about {_duration(self.seconds)} of "
                "attention work")


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} seconds"


def estimate_workload(pipe, transformer, height: int | None = None, width: int | None = None,
                      frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                      generations: float = 1.0) -> Workload | None:
    """Tokens, dense attention memory and time of a run at this size (None for a size the pipeline's defaults do
    not tell). generations: full generations the run makes (warm-ups and repeats)."""
    d = call_defaults(pipe)
    h, w = height or d.get("height"), width or d.get("width")
    f = frames or d.get("num_frames") or 1
    steps = steps or d.get("num_inference_steps") or 50
    guidance = guidance if guidance is not None else d.get("guidance_scale")
    if not all(isinstance(v, int) and v > 0 for v in (h, w, f, steps)):
        return None
    if getattr(pipe, "vae", None) is None:
        spatial = 1
    else:
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
    pt, ph, pw = patch_size(transformer)
    latent_frames = (f - 1) // temporal + 1 if temporal > 1 else f
    grid = (max(1, -(-latent_frames // pt)), max(1, h // spatial // ph), max(1, w // spatial // pw))
    tokens = grid[0] * grid[1] * grid[2]
    config = getattr(transformer, "config", {})
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    heads = int(get("num_attention_heads", None) or 1)
    head_dim = int(get("attention_head_dim", None) or 64)
    layers = int(get("num_layers", None) or 1) + int(get("num_single_layers", None) or 0)
    batch = 2 if isinstance(guidance, (int, float)) and guidance > 1 else 1
    device = getattr(transformer, "device", torch.device("cpu"))
    flops = 4.0 * batch * heads * head_dim * tokens**2 * layers * steps * generations
    seconds = flops / ATTENTION_FLOPS["cuda" if device.type == "cuda" else "cpu"]
    return Workload(tokens, grid, batch * heads * tokens**2 * 4, seconds, (f, h, w))


def available_memory(device: str) -> int | None:
    """Free memory in bytes on `device` (CPU: MemAvailable), None when unknown."""
    if torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_workload(pipe, transformer, device: str, force: bool = False, **sizes) -> Workload | None:
    """Before generating: refuse a size that is too large for the device (on CPU: more than CPU_MAX_TOKENS video
    tokens, or dense attention scores larger than the free memory), naming the token count and the estimates,
    unless `force`. `sizes`: estimate_workload's keywords."""
    work = estimate_workload(pipe, transformer, **sizes)
    if work is None or torch.device(device).type != "cpu":
        return work
    free = available_memory(device)
    why = None
    if work.tokens > CPU_MAX_TOKENS:
        why = f"more than {CPU_MAX_TOKENS:,} video tokens on CPU"
    elif free is not None and work.scores_bytes > free:
        why = f"more than the {_bytes(free)} of free memory"
    if why is None:
        return work
    if force:
        logger.warning("%s (%s); running anyway (--force)", work.describe(), why)
        return work
    raise ArgumentError(f"{work.describe()}: {why}. Use a smaller --height/--width/--frames, or pass --force to "
                        "run it anyway")
