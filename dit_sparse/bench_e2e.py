"""`dit-sparse bench e2e`: end-to-end speed and fidelity of several plans against dense, measured in one run.

Every prompt and seed is generated once dense and once per plan; per plan the report gives mean total and attention
seconds (measured with hooks around the attention modules), the speedup over dense from the same run, the executed
attention density, PSNR and SSIM against dense, and on tiny-shapes the caption accuracy of both.

`--ceiling` adds a run with every covered self-attention head skipped: the rest of the model still runs, so its
speedup is the most any plan can reach on that model and machine (its video is meaningless: no fidelity reported).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import apply, remove, transformers_of
from .atomic import atomic_path, write_json, write_text
from .generate import (
    DTYPES,
    GenerateError,
    check_device_and_dtype,
    check_positive,
    check_workload,
    default_plan_id,
    load_model,
    resolve_plan,
    timed_generation,
    tiny_shapes_weights_id,
    warm_up,
)
from .metrics import PSNR_EXACT, format_metric, psnr, ssim, ssim_unavailable
from .plan import SparsePlan
from .strategies import STRATEGIES


@dataclass
class PlanRun:
    label: str
    plan: SparsePlan | None  # None: dense
    speed_only: bool = False  # the ceiling run: its frames say nothing, so fidelity is not reported


CEILING_LABEL = "ceiling (covered attention skipped)"


def parse_plan_spec(spec: str, pipe, transformer) -> PlanRun:
    """'default', a plan file, or a uniform strategy with optional parameters: 'block_adaptive:tau=0.8,cap=0.3'."""
    name, _, params_text = spec.partition(":")
    if name in STRATEGIES:
        params = {}
        for item in filter(None, split_top_level(params_text)):
            key, _, value = item.partition("=")
            try:
                params[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                raise GenerateError(f"--plans {spec!r}: {value!r} is not a JSON value (lists go in brackets: "
                                    "'diagonal:window=[1,0.25,0.25]')") from None
        return PlanRun(spec, SparsePlan.uniform(transformer, name, **params))
    return PlanRun(spec, resolve_plan(spec, pipe, transformer, option="--plans"))


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets: 'window=[1,2,2],fp8=true' -> ['window=[1,2,2]', 'fp8=true']."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def default_prompts(pipe, count: int) -> list[str]:
    if type(pipe).__name__ == "TinyShapesPipeline":
        from .zoo.shapes_data import heldout_prompts

        return heldout_prompts()[:count]
    raise GenerateError("--prompts FILE is needed for models other than tiny-shapes")


def _caption_ok(pipe, frames, prompt) -> bool | None:
    if type(pipe).__name__ != "TinyShapesPipeline":
        return None
    from .zoo.checker import check_clip

    return bool(check_clip(frames, prompt).ok)


def run_e2e(model: str, plan_specs: list[str], prompts: list[str] | None, num_prompts: int, seeds: list[int],
            steps: int | None, device: str = "cpu", dtype: str = "float32", progress: bool = True,
            ceiling: bool = False, out: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Dense and each plan on every prompt and seed. out: results.json there is rewritten (atomically) after every
    prompt and seed, marked "partial" until the last, so that a fault late in a long run keeps what was measured.
    force: run even when the model's default size is estimated too large for the device (generate.check_workload).
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
        raise GenerateError("no prompts to benchmark")
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
        if out is not None and done < len(jobs):
            write_results_json({**result_so_far(), "partial": f"{done} of {len(jobs)} prompt x seed runs"}, out)
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


def invoked_command() -> str | None:
    """The `dit-sparse ...` command line that is running, for the result file (None when called from Python)."""
    return "dit-sparse " + " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "dit-sparse" else None


def hardware(device: str) -> dict[str, Any]:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # Other work on the machine skews CPU timings badly (thread oversubscription): record it.
            "load_average_1min": os.getloadavg()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    out = {"dit_sparse": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


PLAN_KEYS = ("plan", "seconds", "attention_seconds", "speedup", "attention_speedup", "executed_density", "psnr", "ssim",
             "caption_accuracy", "psnr_note", "ssim_note")


def records_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per plan, each carrying the run's metadata (model, hardware, versions, command, date)."""
    meta = {k: v for k, v in result.items() if k != "results"}
    return [{**meta, **r} for r in result["results"]]


def grouped(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`records_of`: the run's metadata once, with the per-plan rows under ``results``."""
    if not records:
        raise ValueError("no records")
    meta = {k: v for k, v in records[0].items() if k not in PLAN_KEYS}
    return {**meta, "results": [{k: r[k] for k in PLAN_KEYS if k in r} for r in records]}


def write_results_json(result: dict[str, Any], out: Path) -> Path:
    """results.json, a list with one record per plan, each with the run's metadata; strict JSON (no Infinity)."""
    return write_json(out / "results.json", records_of(result), finite=True)


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.json, results.md and speedup_vs_psnr.png, each written atomically (a failed write raises WriteError
    naming the file and keeps those written before it)."""
    write_results_json(result, out)
    write_text(out / "results.md", markdown_table(result) + "\n")
    plot(result, out / "speedup_vs_psnr.png")


def markdown_table(result: dict[str, Any]) -> str:
    fmt = format_metric
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}), {result['prompts']} prompts x "
        f"{len(result['seeds'])} seeds, steps={result['steps'] or 'default'}; "
        f"{result['hardware'].get('gpu') or result['hardware']['processor'] or result['hardware']['machine']}, "
        f"{result['hardware']['cpus']} CPUs; torch {result['versions']['torch']}, "
        f"diffusers {result['versions']['diffusers']}",
        "",
        "| plan | total s | attention s | speedup | attention speedup | executed density | PSNR dB | SSIM "
        "| caption accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['plan']} | {fmt(r['seconds'], '.2f')} | {fmt(r['attention_seconds'], '.2f')} | "
            f"{fmt(r['speedup'], '.2f')}x | {fmt(r['attention_speedup'], '.2f')}x | "
            f"{fmt(r['executed_density'], '.1%')} | "
            f"{fmt(r['psnr'], '.1f', r.get('psnr_note'))} | {fmt(r['ssim'], '.3f')} | "
            f"{fmt(r['caption_accuracy'], '.0%')} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in result["results"]
            if r["plan"] != "dense" and r["psnr"] is not None and np.isfinite(r["psnr"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["psnr"], r["speedup"])
        ax.annotate(r["plan"], (r["psnr"], r["speedup"]), fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("PSNR vs dense (dB)")
    ax.set_ylabel("end-to-end speedup over dense")
    ax.set_title(f"{result['model']} on {result['device']}")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
