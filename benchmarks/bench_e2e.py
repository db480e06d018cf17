"""`dit-sparse bench e2e`'s results: the records of an evaluation run (dit_sparse.evaluation) as results.json,
a markdown table and a speedup-vs-PSNR plot. The measuring itself is the core's (dit_sparse.evaluation.run_e2e)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dit_sparse.atomic import atomic_path, write_json, write_text
from dit_sparse.metrics import format_metric

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
