"""Render the measured results from the committed result files (numbers are never typed by hand).

Every result file under benchmarks/results/ and dit_sparse/zoo/results/ is rendered, with its command, hardware and
versions, into docs/results.md between its markers (wrapped to 120 columns outside tables); README.md gets a headline
table per hardware between its headline markers, from the files named in HEADLINES.

    python benchmarks/render_results.py          # rewrite docs/results.md and the README headline
    python benchmarks/render_results.py --check  # exit 1, naming the file, if either is not what the files give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_PAGE = Path("docs") / "results.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
WIDTH = 120
RESULTS_PAGE_TEMPLATE = f"""# Measured results

Rendered by `python benchmarks/render_results.py` from the files in `benchmarks/results/` and
`dit_sparse/zoo/results/`; a test (`tests/test_results_render.py`) checks that re-rendering reproduces this page.

{START}
{END}
"""


def _load_average(result: dict) -> str:
    load = result["hardware"].get("load_average_1min")
    return "n/a" if load is None else f"{load:.2f}"


def _hardware(result: dict) -> str:
    hw = result.get("hardware", {})
    where = hw.get("gpu") or f"{hw.get('cpus')}-core {hw.get('machine')} CPU ({hw.get('torch_threads')} threads)"
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    return f"{where}; {versions}; {result.get('date', '')[:10]}"


def render_cpu_executor(path: Path, result: dict) -> list[str]:
    shape = result["shape"]
    lines = [
        f"**CPU executor vs dense SDPA** (`{result['command'].strip()}`; fp32, one sequence of {shape['seq']} tokens, "
        f"{shape['heads']} heads, head dim {shape['head_dim']}, blocks {shape['block_q']}x{shape['block_k']}; "
        f"{_hardware(result)}; dense SDPA {result['dense_sdpa_seconds'] * 1e3:.0f} ms; "
        f"file `{path.relative_to(ROOT)}`)",
        "",
        "| layout | density | ms | speedup over dense SDPA | linearity |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['density']:.2%} | {r['seconds'] * 1e3:.0f} | {r['speedup']:.2f}x | "
                     f"{r['linearity']:.2f} |")
    return lines


def render_e2e(path: Path, result: dict) -> list[str]:
    from dit_sparse.bench_e2e import markdown_table
    from dit_sparse.evaluation import CEILING_LABEL

    lines = [f"**End to end: {result['model']}** (`{result.get('command') or 'dit-sparse bench e2e'}`; "
             f"{result['date'][:10]}; 1-minute load average {_load_average(result)}; "
             f"file `{path.relative_to(ROOT)}`)", "", markdown_table(result)]
    ceiling = next((r for r in result["results"] if r["plan"] == CEILING_LABEL), None)
    if ceiling is not None:
        lines += ["", f"The ceiling row skips every covered self-attention head while the rest of the model runs: "
                      f"no plan can be faster end to end than its {ceiling['speedup']:.2f}x on this model and machine."]
    return lines + earlier_default_plan(result)


def earlier_default_plan(result: dict) -> list[str]:
    """A note when the `default` row of a tiny-shapes result ran another default plan than the shipped one."""
    from dit_sparse.plan_spec import default_plan_id, equivalent_default_plan_id

    if result.get("model") != "tiny-shapes" or not any(r["plan"] == "default" for r in result["results"]):
        return []
    shipped, recorded = default_plan_id("TinyShapesPipeline"), result.get("default_plan_id")
    if recorded is not None and recorded in (shipped, equivalent_default_plan_id("TinyShapesPipeline",
                                                                                  result.get("steps"))):
        return []
    which = f"plan id {recorded}" if recorded else "not recorded which"
    return ["", f"*`default` in this table is the default plan shipped when it ran ({which}), not the one shipped "
                f"now (plan id {shipped}).*"]


def render_speed(path: Path, result: dict) -> list[str]:
    from dit_sparse.metrics import format_metric

    size, layers = result["size"], result["layers"]
    lines = [
        f"**Speed only, {result['architecture']} architecture with random weights** "
        f"(`{result.get('command') or 'dit-sparse bench speed'}`; {result['date'][:10]}; "
        f"{layers} layer{'' if layers == 1 else 's'}, {size['frames']}x{size['height']}x{size['width']} px = "
        f"{size['video_tokens']} video tokens, {result['dtype']}"
        f"{', under torch.compile' if result.get('compiled') else ''}; "
        f"{_hardware(result)}; fidelity not measured; file `{path.relative_to(ROOT)}`). Attention s: whole attention "
        "modules (projections, norms, RoPE, cross-attention included); kernel s: the attention kernels of covered "
        "self-attention alone (not recorded before 2026-12-07).",
        "",
        "| plan | forward s | attention s | kernel s | speedup | attention speedup | kernel speedup | executed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(f"| {r['plan']} | {r['seconds']:.3f} | {r['attention_seconds']:.3f} | "
                     f"{_optional(r.get('kernel_seconds'), '.3f')} | {r['speedup']:.2f}x | "
                     f"{format_metric(r.get('attention_speedup'), '.2f')}x | "
                     f"{_optional(r.get('kernel_speedup'), '.2f', 'x')} | {r['executed_density']:.1%} |")
    return lines


def render_search_compare(path: Path, result: dict) -> list[str]:
    from dit_sparse.search.compare_uniform import markdown

    saved = sorted(path.parent.glob("*.stats.json"))
    stats = f"; statistics: `{saved[0].relative_to(ROOT)}`" if saved else ""
    return [f"**Searched vs uniform plans at equal density: {result['model']}** (`python -m "
            f"dit_sparse.search.compare_uniform --stats {result['stats']} ...`; {result['date'][:10]}; file "
            f"`{path.relative_to(ROOT)}`{stats})", "", markdown(result)]


def stale_weights(recorded: str | None, what: str) -> str:
    """A warning when a tiny-shapes result was measured on other weights than the shipped ones."""
    from dit_sparse.zoo.pipeline import weights_id

    shipped = weights_id()
    if recorded is None or recorded == shipped:
        return ""
    return (f"\n\n*Measured with earlier tiny-shapes weights ({what} {recorded}; shipped now: {shipped}); "
            "re-run the command above to refresh.*")


def render_distill(path: Path, result: dict) -> list[str]:
    from dit_sparse.distill.evaluate_student import markdown

    d = result["distill"]
    stale = stale_weights(result.get("teacher_weights"), "teacher weights id")
    return [f"**Distilled {result['student_steps']}-step sparse student vs the dense teacher: {result['teacher']}** "
            f"(`python -m dit_sparse.distill.evaluate_student --student {result['student']} --num-prompts "
            f"{result['num_prompts']}`; student: {d.get('distill_steps')} TDM steps from the teacher with its "
            f"default plan (`dit-sparse distill --teacher {d.get('teacher')} --plan default ...`, exact command in "
            f"`{(path.parent / 'command.txt').relative_to(ROOT)}`); "
            f"{result['hardware']['cpus']}-core {result['hardware']['machine']} CPU; "
            f"file `{path.relative_to(ROOT)}`)", "", markdown(result) + stale]


def _gpu_versions(env: dict) -> str:
    """Device, versions and date of a GPU benchmark's environment record."""
    where = env.get("gpu") or env.get("cpu")
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "driver") if env.get(k))
    return f"{where}; {versions}; {env['time'][:10]}"


def render_kernels(path: Path, result: dict) -> list[str]:
    """`dit-sparse bench kernels` on a GPU: our kernel per density against the dense baselines of the same run."""
    records = result["records"]
    lines = [f"**Kernels: block-sparse attention vs dense baselines** (`dit-sparse bench kernels`; "
             f"{_gpu_versions(result['environment'])}; random layouts, B=1; file `{path.relative_to(ROOT)}`)", "",
             "| H | D | S | impl | density | ms | TFLOP/s dense-equiv. | linearity | speedup vs SDPA flash | "
             "mask estimation / dense | fp8 kernel speedup | backward ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [r["heads"], r["head_dim"], r["seq"], r["impl"], f"{r['density']:.1%}", f"{r['ms']:.2f}",
                 f"{r['tflops_dense_equiv']:.0f}", _optional(r.get("linearity"), ".2f"),
                 _optional(r.get("speedup_vs_dense_sdpa"), ".2f", "x"),
                 _optional(r.get("mask_estimation_fraction"), ".1%"), _optional(r.get("fp8_speedup"), ".2f", "x"),
                 _optional(r.get("bwd_ms"), ".2f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


MASK_ESTIMATION_PIECES = {
    "dense_sdpa": "dense SDPA (default backend)",
    "stats_pytorch": "block statistics of q and k, PyTorch ops",
    "stats_fused": "block statistics of q and k, fused kernel",
    "block_adaptive_layout": "whole `block_adaptive` estimation (statistics, ranking, guards, layout)",
    "pyramid_layout": "whole `pyramid` estimation",
}


def render_mask_estimation(path: Path, result: dict) -> list[str]:
    """benchmarks/bench_mask_estimation.py: each piece of mask estimation against dense SDPA of the same run."""
    shape, ms = result["shape"], result["ms"]
    dense = ms["dense_sdpa"]
    lines = [f"**Mask estimation vs dense attention** (`python benchmarks/bench_mask_estimation.py`; "
             f"{_gpu_versions(result['environment'])}; H={shape['heads']}, D={shape['head_dim']}, "
             f"S={shape['seq']}, {shape['dtype']}, blocks {shape['block_q']}x{shape['block_k']}; "
             f"file `{path.relative_to(ROOT)}`)", "",
             "| piece | ms | share of dense SDPA |", "|---|---|---|"]
    lines += [f"| {MASK_ESTIMATION_PIECES.get(name, name)} | {value:.3f} | {value / dense:.1%} |"
              for name, value in ms.items()]
    return lines


def render_tiles(path: Path, result: dict) -> list[str]:
    """benchmarks/bench_tiles.py: the forward kernel per tile, density and variant, beside dense SDPA."""
    shape = result["shape"]
    dense = ", ".join(f"{name} {value:.2f} ms" for name, value in result["dense_ms"].items())
    lines = [f"**Forward kernel per tile** (`python benchmarks/bench_tiles.py`; "
             f"{_gpu_versions(result['environment'])}; H={shape['heads']}, D={shape['head_dim']}, S={shape['seq']}, "
             f"{shape['dtype']}, layout blocks {shape['block_q']}x{shape['block_k']}; dense: {dense}; "
             f"file `{path.relative_to(ROOT)}`)", "",
             "| tile | density | variant | ms | speedup vs dense | speedup vs 16-bit | autotuned |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tile']} | {r['density']:.1%} | {r['variant']} | {r['ms']:.3f} | "
              f"{r['speedup_vs_dense']:.2f}x | {r['speedup_vs_16bit']:.2f}x | {r['config'] or '-'} |"
              for r in result["records"]]
    return lines


def _optional(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


RENDERERS = {
    "cpu executor vs dense SDPA (fp32, one sequence)": render_cpu_executor,
    "bench kernels": render_kernels,
    "bench e2e": render_e2e,
    "bench speed (random weights; fidelity not measured)": render_speed,
    "search vs uniform at equal density": render_search_compare,
    "distilled student vs teacher": render_distill,
    "mask estimation vs dense SDPA": render_mask_estimation,
    "forward kernel tiles": render_tiles,
}


ZOO_RESULTS = ROOT / "dit_sparse" / "zoo" / "results"


def render_zoo_eval(path: Path, result: dict) -> list[str]:
    held, checker = result["heldout"], result["checker_ground_truth"]
    attrs = ", ".join(f"{k} {v:.0%}" for k, v in held["per_attribute"].items())
    seen = result.get("seen_combinations")
    return [
        f"**tiny-shapes caption accuracy** (`python -m dit_sparse.zoo.evaluate --seen-prompts 10`; {result['steps']} "
        f"steps, guidance {result['guidance_scale']}, {result['size']}; file `{path.relative_to(ROOT)}`): "
        f"held-out prompts **{held['caption_accuracy']:.0%}** of {held['n']} (per attribute: {attrs}; "
        f"{held['seconds_per_clip']} s per clip)"
        + (f"; seen attribute combinations, new seeds: {seen['caption_accuracy']:.0%} of {seen['n']}" if seen else "")
        + f"; the checker on {checker['n']} ground-truth clips: {checker['accuracy']:.0%}."
        + _sensitivity_sentence(result.get("attribute_sensitivity"))
        + _word_choice_sentence(result.get("word_choice")),
    ]


def _sensitivity_sentence(sensitivity: dict | None) -> str:
    """How strongly the prediction responds to each caption attribute at the highest noise level measured."""
    if not sensitivity:
        return ""
    sigma = max(next(iter(sensitivity.values())), key=float)
    parts = ", ".join(f"{name} {per[sigma]:.3f}" for name, per in sensitivity.items())
    return (f" Attribute sensitivity (relative change of the predicted clean clip when only that attribute of the "
            f"caption changes, sigma {sigma}; `dit_sparse/zoo/conditioning.py`): {parts}.")


def _word_choice_sentence(choice: dict | None) -> str:
    """How often the true word of an attribute gives the lowest denoising loss, against chance."""
    if not choice:
        return ""
    parts = "; ".join(
        f"{name} " + ", ".join(f"{acc:.0%} at sigma {sigma}" for sigma, acc in per.items())
        + f" (chance {choice['chance'][name]:.0%})"
        for name, per in choice.items() if name != "chance")
    return (f" Word choice (share of real clips on which the caption with the true word gives the strictly lowest "
            f"denoising loss): {parts}.")


def render_zoo_attention(path: Path, result: dict) -> list[str]:
    w = result["window"]
    lines = [
        f"**tiny-shapes attention structure** (`python -m dit_sparse.zoo.attention_report`; share of self-attention "
        f"heads with >= {result['threshold']:.0%} of their mass inside +/-{w['frames']} frame, +/-{w['rows']} x "
        f"+/-{w['cols']} tokens, a window holding {result['window_fraction_of_keys']:.1%} of the keys; "
        f"{len(result['prompts'])} held-out prompts, every step and CFG branch; file `{path.relative_to(ROOT)}`; "
        "maps: `docs/attention_maps.png`)",
        "",
        "| layer | share of local heads | share of local head-calls | mean local mass per head |",
        "|---|---|---|---|",
    ]
    for layer, r in result["layers"].items():
        masses = ", ".join(f"{h['local']:.2f}" for h in r["heads"])
        lines.append(f"| {layer} | {r['share_local_heads']:.0%} | {r['share_local_head_calls']:.0%} | {masses} |")
    return lines


ZOO_RENDERERS = {"eval.json": render_zoo_eval, "attention.json": render_zoo_attention}


def section(renderer, path: Path, result: dict) -> str:
    """One result's section; flagged when it records tiny-shapes weights other than the shipped ones."""
    return "\n".join(renderer(path, result)) + stale_weights(result.get("weights_id"), "weights id")


def render() -> str:
    sections = []
    for name, renderer in ZOO_RENDERERS.items():
        path = ZOO_RESULTS / name
        if path.is_file():
            sections.append(section(renderer, path, json.loads(path.read_text())))
    for path in sorted(RESULTS.rglob("*.json")):
        result = json.loads(path.read_text())
        if isinstance(result, list) and result and isinstance(result[0], dict):  # one record per plan
            from dit_sparse.bench_e2e import grouped

            result = grouped(result)
        renderer = RENDERERS.get(benchmark_name(result)) if isinstance(result, dict) else None
        if renderer is not None:
            sections.append(section(renderer, path, result))
    return "\n\n".join(sections) if sections else "No result files yet."


def benchmark_name(result: dict) -> str | None:
    """The result's kind; kernel benchmark files written before they named it are known by their two keys."""
    if "benchmark" in result:
        return result["benchmark"]
    return "bench kernels" if {"environment", "records"} <= result.keys() else None


# A wrapped line must not start with what would turn it into a list item, heading, quote, table row, HTML block,
# code fence or setext underline.
_BLOCK_START = re.compile(r"([-+*]|\d+[.)])(\s|$)|[#>|<]|```|~~~|[-=]+\s*$")


def wrap_line(line: str) -> list[str]:
    """One Markdown line as lines of at most WIDTH characters (a word longer than that keeps its own line); a line
    that starts with something Markdown would read as a new block takes the word before it along."""
    lines = textwrap.wrap(line, width=WIDTH, break_long_words=False, break_on_hyphens=False) or [line]
    i = 1
    while i < len(lines):
        head, _, last = lines[i - 1].rpartition(" ")
        if _BLOCK_START.match(lines[i]) and head:
            lines[i - 1:] = [head] + textwrap.wrap(f"{last} {' '.join(lines[i:])}", width=WIDTH,
                                                   break_long_words=False, break_on_hyphens=False)
        else:
            i += 1
    return lines


def wrap_markdown(text: str) -> str:
    """Every line over WIDTH characters wrapped, except table rows (they cannot wrap)."""
    out = []
    for line in text.split("\n"):
        out.extend([line] if len(line) <= WIDTH or line.startswith("|") else wrap_line(line))
    return "\n".join(out)


def _fill(text: str, start: str, end: str, body: str, name: str) -> str:
    """text with body between the markers start and end."""
    if start not in text or end not in text:
        raise SystemExit(f"{name} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def updated_results_page(text: str | None) -> str:
    """docs/results.md with every result rendered between its markers (the page is created when missing)."""
    return _fill(RESULTS_PAGE_TEMPLATE if text is None else text, START, END, wrap_markdown(render()),
                 str(RESULTS_PAGE))


# ---- README headline: one small table per hardware, from the result files named here ----------------------------


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
    from dit_sparse.bench_e2e import grouped

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


def updated_readme(text: str, root: Path = ROOT) -> str:
    """README.md with the headline between its markers."""
    return _fill(text, HEADLINE_START, HEADLINE_END, render_headline(root), "README.md")


def rendered() -> dict[Path, str]:
    """Each file this script writes, with the text the result files give it."""
    page = ROOT / RESULTS_PAGE
    return {page: updated_results_page(page.read_text() if page.is_file() else None),
            ROOT / "README.md": updated_readme((ROOT / "README.md").read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a rendered file is stale; write nothing")
    args = parser.parse_args(argv)
    stale = 0
    for path, new in rendered().items():
        old = path.read_text() if path.is_file() else None
        if new == old:
            continue
        if args.check:
            stale += 1
            what = "results section" if path.name == "results.md" else "headline"
            print(f"{path.relative_to(ROOT)} {what} is stale: run python benchmarks/render_results.py",
                  file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
