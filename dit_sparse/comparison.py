"""One prompt and seed generated dense and with a plan: warm-ups, timed generations, and what they measure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .api import apply, remove
from .checks import ArgumentError
from .metrics import psnr, ssim, ssim_unavailable
from .plan import SparsePlan
from .timing import AttentionTimer, KernelTimer


def warm_up(pipe, kwargs) -> None:
    """One untimed short generation, so that one-time costs (allocator, kernel selection, lazy imports) are not
    charged to whichever timed run comes first. Two steps, not one: a scheduler stretched to a terminal sigma
    (e.g. a distilled student's) cannot make a one-step grid."""
    progress = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        steps = min(2, kwargs.get("num_inference_steps") or 2)
        pipe(generator=torch.Generator(device="cpu").manual_seed(0), **{**kwargs, "num_inference_steps": steps})
    except ValueError as e:
        raise ArgumentError(f"the pipeline refused these settings: {e}") from None
    finally:
        if progress is not None:
            pipe._progress_bar_config = progress
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config


def timed_generation(pipe, kwargs, seed, device, timer_target) -> tuple[np.ndarray, float, float, float]:
    """One generation: (frames (T, H, W, 3) in [0, 1], total seconds, seconds inside attention modules, seconds
    inside the attention kernels dit-sparse runs (0 when none runs: the stock model))."""
    timer, kernels = AttentionTimer(), KernelTimer()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with timer.measure(*timer_target), kernels.measure():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            result = pipe(generator=generator, **kwargs)
        except ValueError as e:
            raise ArgumentError(f"the pipeline refused these settings: {e}") from None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    frames = result.frames[0]
    frames = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    return frames, total, timer.seconds, kernels.seconds


@dataclass
class Comparison:
    """One dense and one sparse generation with the same seed, and what was measured."""

    dense: np.ndarray  # (T, H, W, 3) float in [0, 1]
    sparse: np.ndarray
    metrics: dict[str, Any]


def compare_dense_sparse(pipe, plan: SparsePlan, call_kwargs: dict[str, Any], seed: int, device: str = "cpu",
                         executor: str | None = None, repeats: int = 1,
                         on_frames: Callable[[str, np.ndarray], None] | None = None,
                         dense_plan: SparsePlan | None = None) -> Comparison:
    """Run `pipe` dense, then with `plan` applied, same seed; time both (total and attention) and compare.

    repeats: timed generations each way, interleaved (dense, sparse, dense, ...); each timing is the fastest, so
    that a burst of other load on the machine does not decide the ratio. on_frames("dense" or "sparse", frames):
    called as soon as each way's first generation exists (generate writes its video then, so that a later fault
    keeps it). dense_plan: run the dense generations through this (dense) plan rather than the model's own
    processors (under context parallelism, where those cannot run every parallel mode)."""
    from .api import transformers_of

    transformers = transformers_of(pipe)

    def run_dense(run):
        if dense_plan is None:
            return run()
        apply(pipe, dense_plan, executor=executor)
        try:
            return run()
        finally:
            remove(pipe)

    run_dense(lambda: warm_up(pipe, call_kwargs))
    apply(pipe, plan, executor=executor)
    try:
        warm_up(pipe, call_kwargs)  # the sparse path's own one-time costs (layouts, executor buffers)
    finally:
        remove(pipe)
    dense_runs, sparse_runs = [], []
    for i in range(repeats):
        dense_runs.append(run_dense(lambda: timed_generation(pipe, call_kwargs, seed, device, transformers)))
        if i == 0 and on_frames is not None:
            on_frames("dense", dense_runs[0][0])
        processor = apply(pipe, plan, executor=executor)
        try:
            sparse_runs.append(timed_generation(pipe, call_kwargs, seed, device, transformers))
        finally:
            remove(pipe)
        if i == 0 and on_frames is not None:
            on_frames("sparse", sparse_runs[0][0])
    dense, sparse = dense_runs[0][0], sparse_runs[0][0]
    dense_s, dense_attn = min(r[1] for r in dense_runs), min(r[2] for r in dense_runs)
    sparse_s, sparse_attn = min(r[1] for r in sparse_runs), min(r[2] for r in sparse_runs)
    metrics: dict[str, Any] = {
        "repeats": repeats,
        "dense_seconds": dense_s,
        "sparse_seconds": sparse_s,
        "speedup": dense_s / sparse_s,
        "dense_attention_seconds": dense_attn,
        "sparse_attention_seconds": sparse_attn,
        "attention_speedup": dense_attn / sparse_attn if sparse_attn else None,
        "sparse_kernel_seconds": min(r[3] for r in sparse_runs),
        "executed_attention_density": processor.stats.summed_over_ranks().executed_density,
        "psnr": psnr(dense, sparse),  # inf when identical (a result file writes null with a note: metrics.for_json)
        "ssim": ssim(dense, sparse),  # None when the frames are too small for SSIM
        "dense_caption_ok": None,
        "sparse_caption_ok": None,
    }
    if metrics["ssim"] is None:
        metrics["ssim_note"] = ssim_unavailable(dense.shape)
    if type(pipe).__name__ == "TinyShapesPipeline":
        from .zoo.checker import check_clip

        try:
            metrics["dense_caption_ok"] = bool(check_clip(dense, call_kwargs["prompt"]).ok)
            metrics["sparse_caption_ok"] = bool(check_clip(sparse, call_kwargs["prompt"]).ok)
        except ValueError as e:  # a prompt outside the grammar cannot be checked
            metrics["caption_check"] = str(e)
    return Comparison(dense, sparse, metrics)
