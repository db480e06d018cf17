"""The README's headline: one small table per hardware, from the result files named in HEADLINES."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_e2e import grouped
from benchmarks.markdown_wrap import wrap_line
from benchmarks.results_sections import ROOT


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _fidelity(row: dict) -> str:
    """PSNR / SSIM: "exact" for identical videos (Infinity in older files, null with an "exact" note in newer
    ones), "n/a" for a value not measured."""
    from dit_sparse.metrics import format_metric

    return f"{format_metric(row['psnr'], '.1f', row.get('psnr_note'))} / {format_metric(row['ssim'], '.3f')}"


def _plan_name(plan: str, model: str) -> str:
    """A plan file as its name without the folder, the model and `.plan.json`; a plan spec as it is."""
    if not plan.endswith(".plan.json"):
        return plan
    return Path(plan).name.removesuffix(".plan.json").removeprefix(f"{model}-")


def _tiny_shapes_clip(steps: int | None, frames_shape: list[int] | None = None) -> tuple[int, str]:
    """tiny-shapes' steps and tokens per clip: a result records them only where they differ from the defaults."""
    from dit_sparse.zoo import pipeline

    frames, height, width = frames_shape[:3] if frames_shape else (pipeline.DEFAULT_FRAMES,
                                                                    pipeline.DEFAULT_HEIGHT, pipeline.DEFAULT_WIDTH)
    config = json.loads((pipeline.WEIGHTS_DIR / "transformer" / "config.json").read_text())
    pt, ph, pw = config["patch_size"]
    return steps or pipeline.DEFAULT_STEPS, f"{frames // pt * (height // ph) * (width // pw):,}"


def _sparse_rows(result: dict) -> list[dict]:
    """A bench result's plan rows after its dense row (the ceiling of `bench e2e --ceiling` is no plan)."""
    from dit_sparse.evaluation import CEILING_LABEL

    dense, *rows = result["results"]
    assert dense["plan"] == "dense", "a bench result starts with its dense row"
    return [r for r in rows if r["plan"] != CEILING_LABEL]


def _fastest(result: dict) -> dict:
    return max(_sparse_rows(result), key=lambda r: r["speedup"])


def _e2e_row(result: dict, row: dict) -> list[str]:
    seeds = len(result["seeds"])
    steps, tokens = _tiny_shapes_clip(result["steps"])
    prompts = f"{result['prompts']} prompts" + (f" x {seeds} seeds" if seeds > 1 else "")
    return [f"{result['model']}, {steps} steps, {prompts}", tokens, _plan_name(row["plan"], result["model"]),
            f"{row['executed_density']:.1%}", f"{row['speedup']:.2f}x", _fidelity(row)]


def headline_generate(result: dict) -> list[list[str]]:
    """`dit-sparse generate` (the quick start): one clip dense and with the plan, same prompt and seed."""
    steps, tokens = _tiny_shapes_clip(result["steps"], result["frames_shape"])
    return [[f"{result['model']}, {steps} steps, quick start", tokens, _plan_name(result["plan"], result["model"]),
             f"{result['executed_attention_density']:.1%}",
             f"{result['speedup']:.2f}x ({_seconds(result['dense_seconds'])} -> "
             f"{_seconds(result['sparse_seconds'])} s)", _fidelity(result)]]


def headline_e2e_default(result: dict) -> list[list[str]]:
    """`bench e2e`: the row of the default plan."""
    return [_e2e_row(result, r) for r in _sparse_rows(result) if r["plan"] == "default"]


def headline_e2e_fastest(result: dict) -> list[list[str]]:
    """`bench e2e`: the plan with the highest speedup."""
    return [_e2e_row(result, _fastest(result))]


def _speed_row(result: dict, row: dict) -> list[str]:
    size, layers = result["size"], result["layers"]
    compiled = ", compiled" if result.get("compiled") else ""
    return [f"{result['architecture']}, {layers} layer{'' if layers == 1 else 's'}{compiled}",
            f"{size['video_tokens']:,}", row["plan"], f"{row['executed_density']:.1%}", f"{row['speedup']:.2f}x",
            "speed only, random weights" if not compiled else "speed only"]


def headline_speed_fastest(result: dict) -> list[list[str]]:
    """`bench speed`: the plan with the highest speedup."""
    return [_speed_row(result, _fastest(result))]


def headline_speed(result: dict) -> list[list[str]]:
    """`bench speed`: every plan."""
    return [_speed_row(result, r) for r in _sparse_rows(result)]


KERNEL = "triton"  # the block-sparse kernel's `impl` in `bench kernels` records; the others are dense baselines


def headline_kernels(result: dict, density: float = 0.1) -> list[list[str]]:
    """`bench kernels`: the block-sparse kernel at the density nearest 10% against the fastest dense baseline."""
    records = result["records"]
    baseline = min((r for r in records if r["impl"] != KERNEL and r["density"] == 1.0), key=lambda r: r["ms"])
    sparse = min((r for r in records if r["impl"] == KERNEL), key=lambda r: abs(r["density"] - density))
    return [[f"attention, {sparse['heads']} heads, {sparse['dtype']}", f"{sparse['seq']:,}", "block-sparse kernel",
             f"{sparse['density']:.1%}", f"{baseline['ms'] / sparse['ms']:.2f}x vs {baseline['impl']}",
             "speed only"]]


HEADLINES = {  # hardware -> {result file: its rows}
    "CPU": {
        "benchmarks/results/generate-tiny-shapes-cpu/report.json": headline_generate,
        "benchmarks/results/e2e-tiny-shapes-cpu/results.json": headline_e2e_default,
        "benchmarks/results/search-tiny-shapes/reuse-schedule/results.json": headline_e2e_fastest,
        "benchmarks/results/search-tiny-shapes/reuse-schedule-50steps-default-grid/results.json": headline_e2e_fastest,
        "benchmarks/results/speed-wan2.1-1.3b-cpu/results.json": headline_speed_fastest,
        "benchmarks/results/speed-wan2.1-1.3b-cpu-compiled/results.json": headline_speed_fastest,
    },
    "GPU": {
        "benchmarks/results/gpu-2026-12-04/speed-wan2.1-1.3b/results.json": headline_speed,
        "benchmarks/results/gpu-2026-12-04/rerun/speed-wan2.1-1.3b/results.json": headline_speed,
        "benchmarks/results/gpu-2026-12-04/kernels-nvidia-h200.json": headline_kernels,
    },
}


def _platform(result: dict) -> tuple[str, str]:
    """(device, versions) of a result, as `_hardware` and `_gpu_versions` read them."""
    env = result.get("environment")
    if env is not None:  # bench kernels
        device, cuda, versions = env.get("gpu") or env.get("cpu"), env.get("cuda"), env
    else:
        hw, versions = result["hardware"], result["versions"]
        device = hw.get("gpu") or f"{hw['cpus']}-core {hw['machine']}, {hw['torch_threads']} torch threads"
        cuda = hw.get("cuda")
    names = ("torch", "triton") if cuda else ("torch",)
    parts = [f"CUDA {cuda}"] if cuda else []
    parts += [f"{name} {versions[name]}" for name in names if versions.get(name)]
    return device, ", ".join(parts)


def _date(result: dict) -> str | None:
    date = result.get("date") or result.get("environment", {}).get("time")
    return date[:10] if date else None


def _load(path: Path):
    result = json.loads(path.read_text())
    return grouped(result) if isinstance(result, list) else result


def _one(values: list[str]) -> str:
    return " / ".join(dict.fromkeys(values))


def headline_table(hardware: str, files: dict, refs: dict[str, int], root: Path = ROOT) -> list[str]:
    """One hardware's table (named in its first header cell), a row per measurement, with its speedup against dense
    in the same run and a reference link ([n], numbered in refs) to its result file, so that the rows stay short;
    under it a note with the dates, the hardware and the versions."""
    rows, devices, versions, dates, undated = [], [], [], [], []
    for name, rows_of in files.items():
        result = _load(root / name)
        device, version = _platform(result)
        devices.append(device)
        versions.append(version)
        ref = refs.setdefault(name, len(refs) + 1)
        date = _date(result)
        if date:
            dates.append(date)
        else:
            undated.append(f"[{ref}]")
        rows += [cells + [f"[{ref}]"] for cells in rows_of(result)]
    when = dates and (min(dates) if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}")
    note = f"Measured {when or 'on dates not recorded'}" + (f" ({', '.join(undated)} records no date)"
                                                             if undated and dates else "")
    return [f"| {hardware} ({_one(devices)}) | tokens | plan | executed | speedup vs dense | PSNR dB / SSIM vs dense "
            "| file |",
            "|---|---|---|---|---|---|---|", *("| " + " | ".join(cells) + " |" for cells in rows), "",
            *wrap_line(f"*{note} on {_one(devices)}; {_one(versions)}; speedups vs dense in the same run.*")]


def render_headline(root: Path = ROOT) -> str:
    """The README's headline: one table per hardware from the files in HEADLINES, then the files' link targets."""
    refs: dict[str, int] = {}
    tables = ["\n".join(headline_table(hardware, files, refs, root)) for hardware, files in HEADLINES.items()]
    return "\n\n".join(tables + ["\n".join(f"[{n}]: {name}" for name, n in refs.items())])
