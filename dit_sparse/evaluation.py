"""Several plans against dense over prompts and seeds, in one run: per plan the mean total and attention seconds,
the speedup over dense from the same run, the executed density, PSNR and SSIM against dense, and on tiny-shapes the
caption accuracy of both.

A ceiling run (every covered self-attention head skipped) gives the most any plan can reach on that model and
machine; its video is meaningless, so no fidelity is reported for it.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import numpy as np

from .api import apply, remove, transformers_of
from .checks import ArgumentError, check_positive
from .comparison import timed_generation, warm_up
from .metrics import PSNR_EXACT, psnr, ssim, ssim_unavailable
from .models import DTYPES, check_device_and_dtype, default_prompts, load_model, tiny_shapes_weights_id
from .plan import SparsePlan
from .plan_spec import PlanRun, default_plan_id, parse_plan_spec
from .provenance import hardware, invoked_command, versions
from .workload import check_workload

CEILING_LABEL = "ceiling (covered attention skipped)"


def _caption_ok(pipe, frames, prompt) -> bool | None:
    if type(pipe).__name__ != "TinyShapesPipeline":
        return None
    from .zoo.checker import check_clip

    return bool(check_clip(frames, prompt).ok)


def run_e2e(model: str, plan_specs: list[str], prompts: list[str] | None, num_prompts: int, seeds: list[int],
            steps: int | None, device: str = "cpu", dtype: str = "float32", progress: bool = True,
            ceiling: bool = False, on_partial: Callable[[dict[str, Any]], None] | None = None,
            force: bool = False) -> dict[str, Any]:
    """Dense and each plan on every prompt and seed. on_partial(result): called after every prompt and seed but the
    last with the result so far, marked "partial" (bench e2e rewrites its results.json then, so that a fault late in
    a long run keeps what was measured).
    force: run even when the model's default size is estimated too large for the device (workload.check_workload).
    """
    check_positive(num_prompts=num_prompts, steps=steps)
    check_device_and_dtype(device, dtype)
    pipe = load_model(model, device, DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    transformers = transformers_of(pipe)
    runs = [PlanRun("dense", None)] + [parse_plan_spec(s, pipe, transformers[0]) for s in plan_specs]
    if ceiling:
        runs.append(PlanRun(CEILING_LABEL, SparsePlan.uniform(transformers[0], "skip"), speed_only=True))
    runs = _unique_labels(runs)
    prompts = prompts or default_prompts(pipe, num_prompts)
    if not prompts:
        raise ArgumentError("no prompts to benchmark")
    kwargs: dict[str, Any] = {"output_type": "np"}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    samples: dict[str, list[dict[str, Any]]] = {r.label: [] for r in runs}
    jobs = [(p, s) for p in prompts for s in seeds]
    check_workload(pipe, transformers[0], device, force=force, steps=steps,
                   generations=len(jobs) * len(runs) + 2 / (steps or 20))
    from tqdm.auto import tqdm

    meta = {
        "benchmark": "bench e2e",
        "model": model,
        "weights_id": tiny_shapes_weights_id(model),
        "default_plan_id": default_plan_id(type(pipe).__name__) if "default" in plan_specs else None,
        "device": device,
        "dtype": dtype,
        "steps": steps,
        "prompts": len(prompts),
        "seeds": seeds,
        "command": invoked_command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(device),
        "versions": versions(),
    }

    def result_so_far() -> dict[str, Any]:
        dense = samples["dense"]
        return {**meta, "results": [_summarise(r.label, samples[r.label], dense, r.speed_only) for r in runs]}

    warm_up(pipe, {**kwargs, "prompt": jobs[0][0]})
    for done, (prompt, seed) in enumerate(tqdm(jobs, desc="bench e2e", disable=not progress), 1):
        call = {**kwargs, "prompt": prompt}
        dense_frames = None
        for run in runs:
            processor = apply(pipe, run.plan) if run.plan is not None else None
            try:
                frames, total, attention, _ = timed_generation(pipe, call, seed, device, transformers)
            finally:
                if processor is not None:
                    remove(pipe)
            dense_frames = frames if run.plan is None else dense_frames
            samples[run.label].append({
                "seconds": total, "attention_seconds": attention,
                "density": processor.stats.executed_density if processor else 1.0,
                "psnr": psnr(dense_frames, frames) if processor else float("inf"),
                "ssim": ssim(dense_frames, frames) if processor else 1.0,
                "ssim_note": ssim_unavailable(np.shape(frames)),
                "caption_ok": _caption_ok(pipe, frames, prompt),
            })
        if on_partial is not None and done < len(jobs):
            on_partial({**result_so_far(), "partial": f"{done} of {len(jobs)} prompt x seed runs"})
    return result_so_far()


def _unique_labels(runs: list[PlanRun]) -> list[PlanRun]:
    """Results are keyed by label: a plan spec given twice, or a plan spelled 'dense', gets a numbered label."""
    seen: dict[str, int] = {}
    out = []
    for run in runs:
        n = seen.get(run.label, 0) + 1
        seen[run.label] = n
        out.append(run if n == 1 else PlanRun(f"{run.label} #{n}", run.plan, run.speed_only))
    return out


def _summarise(label: str, rows: list[dict], dense: list[dict], speed_only: bool = False) -> dict[str, Any]:
    mean = lambda key, src=rows: float(np.mean([r[key] for r in src]))  # noqa: E731
    captions = [r["caption_ok"] for r in rows if r["caption_ok"] is not None]
    finite_psnr = [r["psnr"] for r in rows if np.isfinite(r["psnr"])]
    ssims = [r["ssim"] for r in rows if r["ssim"] is not None]
    speed = {
        "plan": label,
        "seconds": mean("seconds"),
        "attention_seconds": mean("attention_seconds"),
        "speedup": mean("seconds", dense) / mean("seconds"),
        "attention_speedup": mean("attention_seconds", dense) / mean("attention_seconds"),
        "executed_density": mean("density"),
    }
    if speed_only:
        return {**speed, "psnr": None, "ssim": None, "caption_accuracy": None}
    record = {
        **speed,
        # identical videos have an infinite PSNR: strict JSON has no Infinity, so null with a note ("exact")
        "psnr": float(np.mean(finite_psnr)) if finite_psnr else None,
        "ssim": float(np.mean(ssims)) if ssims else None,
        "caption_accuracy": float(np.mean(captions)) if captions else None,
    }
    if not finite_psnr:
        record["psnr_note"] = PSNR_EXACT
    if not ssims:
        record["ssim_note"] = next((r["ssim_note"] for r in rows if r.get("ssim_note")), "no SSIM measured")
    return record
