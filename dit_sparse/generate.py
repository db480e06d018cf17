"""`dit-sparse generate`: the same prompt and seed dense and sparse, with timings, fidelity and the caption check."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json
from .checks import ArgumentError, check_out_folder, check_positive, check_sizes
from .comparison import compare_dense_sparse
from .executors import get_executor
from .metrics import for_json, is_exact
from .models import DEFAULT_PROMPTS, DTYPES, TINY_SHAPES, check_device_and_dtype, check_model_name, load_model
from .parallel import launch as parallel_launch
from .plan import SparsePlan
from .plan_spec import resolve_plan
from .provenance import hardware, versions
from .video import side_by_side, write_video
from .workload import check_workload

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    plan: str | None = None
    model: str = TINY_SHAPES
    device: str = "cpu"
    dtype: str = "float32"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    out: str | None = "out/generate"
    executor: str | None = None
    progress: bool = True
    repeats: int = 2
    force: bool = False  # run even when the size estimate says the run is too large for the device
    ulysses: int = 1  # context parallelism (under torchrun): Ulysses degree
    ring: int = 1  # and ring degree; their product is the number of processes


def _call_kwargs(cfg: GenerateConfig, pipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"output_type": "np"}
    kwargs["prompt"] = cfg.prompt or DEFAULT_PROMPTS.get(type(pipe).__name__, "a cat walking on grass")
    for name, value in (("num_inference_steps", cfg.steps), ("guidance_scale", cfg.guidance),
                        ("height", cfg.height), ("width", cfg.width), ("num_frames", cfg.frames)):
        if value is not None:
            kwargs[name] = value
    return kwargs


def _validate(cfg: GenerateConfig) -> None:
    if cfg.steps is not None and cfg.steps <= 0:
        raise ArgumentError(f"--steps must be a positive number of denoising steps, got {cfg.steps}")
    if cfg.repeats < 1:
        raise ArgumentError(f"--repeats must be at least 1 (timed generations each way), got {cfg.repeats}")
    check_positive(ulysses=cfg.ulysses, ring=cfg.ring)
    if cfg.guidance is not None and not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise ArgumentError(f"--guidance must be a number >= 0 (1 or less turns guidance off), got {cfg.guidance}")
    check_sizes(height=cfg.height, width=cfg.width, frames=cfg.frames)
    check_device_and_dtype(cfg.device, cfg.dtype)
    if cfg.executor is not None:
        get_executor(cfg.executor, cfg.device)  # known, and able to run on that device
    check_model_name(cfg.model)
    if cfg.out:
        check_out_folder(cfg.out)


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate dense and sparse with the same seed; return (and write, with --out) the report.

    With --out, each file is written atomically as soon as it exists: dense.mp4 after the dense run, sparse.mp4
    after the sparse run, report.json once the metrics are known, then side_by_side.mp4; a late fault (a full disk)
    keeps what was written before it and raises WriteError naming the file."""
    _validate(cfg)
    launch = parallel_launch.start(cfg.device, cfg.ulysses, cfg.ring) if cfg.ulysses * cfg.ring > 1 else None
    device = launch.device if launch else cfg.device
    leads = launch is None or launch.leads
    pipe = load_model(cfg.model, device, DTYPES[cfg.dtype])
    pipe.set_progress_bar_config(disable=not (cfg.progress and leads), desc="denoising")
    from .api import transformers_of

    transformer = transformers_of(pipe)[0]
    if launch is not None:
        for each in transformers_of(pipe):
            parallel_launch.enable(each, cfg.ulysses, cfg.ring)
    check_workload(pipe, transformer, cfg.device, force=cfg.force, height=cfg.height, width=cfg.width,
                   frames=cfg.frames, steps=cfg.steps, guidance=cfg.guidance, generations=2 * cfg.repeats + 0.2)
    plan = resolve_plan(cfg.plan, pipe, transformer)
    kwargs = _call_kwargs(cfg, pipe)
    out = Path(cfg.out) if cfg.out and leads else None  # under torchrun, rank 0 writes

    def write_as_you_go(name: str, frames: np.ndarray) -> None:
        if out is not None:
            write_video(out / f"{name}.mp4", frames)

    # Under context parallelism the dense run goes through dit-sparse's dense plan too: diffusers' own attention
    # has no ring on CPU, and some families' stock processors (CogVideoX's) do not run in parallel at all.
    dense_plan = SparsePlan.uniform(transformer, "dense") if launch is not None else None
    result = compare_dense_sparse(pipe, plan, kwargs, cfg.seed, device, cfg.executor, cfg.repeats,
                                  on_frames=write_as_you_go, dense_plan=dense_plan)
    report: dict[str, Any] = {
        "model": cfg.model,
        "plan": cfg.plan or "default",
        "prompt": kwargs["prompt"],
        "seed": cfg.seed,
        "steps": kwargs.get("num_inference_steps"),
        "device": cfg.device,
        "dtype": cfg.dtype,
        "context_parallel": {"ulysses": cfg.ulysses, "ring": cfg.ring} if launch else None,
        "frames_shape": list(result.dense.shape),
        **result.metrics,
        "hardware": {**hardware(device), "processes": launch.world if launch else 1},
        "versions": versions(),
    }
    if out is not None:
        write_report(out / "report.json", report)
        write_video(out / "side_by_side.mp4", side_by_side(result.dense, result.sparse))
    return report


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """report.json in strict JSON: an exact PSNR is null with "psnr_note", never Infinity."""
    return write_json(path, for_json(report), finite=True)


TIMERS_NOTE = ("(attention seconds time whole attention modules, projections, norms, RoPE and cross-attention "
               "included; kernel seconds time the sparse plan's attention kernels alone)")


def format_report(report: dict[str, Any]) -> str:
    def fmt(key, v):
        note = report.get(f"{key}_note")
        if is_exact(v, note):
            return "exact (the videos are identical)"
        if v is None and note:
            return f"n/a ({note})"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = ["dense_seconds", "sparse_seconds", "speedup", "dense_attention_seconds", "sparse_attention_seconds",
            "attention_speedup", "sparse_kernel_seconds", "executed_attention_density", "psnr", "ssim",
            "dense_caption_ok", "sparse_caption_ok"]
    lines = [f"{k:>28}: {fmt(k, report[k])}" for k in keys if k in report]
    return "\n".join(lines + [TIMERS_NOTE])
