"""The sections of docs/results.md: one renderer per kind of result file, each stating the file's command,
hardware and versions beside its numbers (benchmarks/render_results.py writes the page)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_e2e import grouped, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def titled_table(title: str, *columns: str) -> list[str]:
    """A section's first lines: its title paragraph, then the head of its table."""
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


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
    lines = titled_table(
        f"**CPU executor vs dense SDPA** (`{result['command'].strip()}`; fp32, one sequence of {shape['seq']} tokens, "
        f"{shape['heads']} heads, head dim {shape['head_dim']}, blocks {shape['block_q']}x{shape['block_k']}; "
        f"{_hardware(result)}; dense SDPA {result['dense_sdpa_seconds'] * 1e3:.0f} ms; "
        f"file `{path.relative_to(ROOT)}`)",
        "layout", "density", "ms", "speedup over dense SDPA", "linearity")
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['density']:.2%} | {r['seconds'] * 1e3:.0f} | {r['speedup']:.2f}x | "
                     f"{r['linearity']:.2f} |")
    pieces = result.get("piece_sizes")
    if pieces:
        by_layout = {}
        for r in pieces:
            size = f"{r['max_keys_per_call']} keys" if r["max_keys_per_call"] else "never cut"
            times = by_layout.setdefault(f"{r['layout']} at {r['density']:.0%}", [])
            times.append(f"{size} {r['seconds'] * 1e3:.0f} ms")
        compared = "; ".join(f"{layout}: {', '.join(times)}" for layout, times in by_layout.items())
        lines += ["", f"Longest key list per kernel call (the executor cuts longer lists into pieces of at most "
                      f"{result['max_keys_per_call']} keys): {compared}."]
    return lines


def render_e2e(path: Path, result: dict) -> list[str]:
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
    lines = titled_table(
        f"**Speed only, {result['architecture']} architecture with random weights** "
        f"(`{result.get('command') or 'dit-sparse bench speed'}`; {result['date'][:10]}; "
        f"{layers} layer{'' if layers == 1 else 's'}, {size['frames']}x{size['height']}x{size['width']} px = "
        f"{size['video_tokens']} video tokens, {result['dtype']}"
        f"{', under torch.compile' if result.get('compiled') else ''}; "
        f"{_hardware(result)}; fidelity not measured; file `{path.relative_to(ROOT)}`). Forward s: the best of "
        f"{_forwards(result)}. Attention s: whole attention "
        "modules (projections, norms, RoPE, cross-attention included); kernel s: the attention kernels of covered "
        "self-attention alone (not recorded before 2026-12-07).",
        "plan", "forward s", "attention s", "kernel s", "speedup", "attention speedup", "kernel speedup", "executed")
    for r in result["results"]:
        lines.append(f"| {r['plan']} | {r['seconds']:.3f} | {r['attention_seconds']:.3f} | "
                     f"{_optional(r.get('kernel_seconds'), '.3f')} | {r['speedup']:.2f}x | "
                     f"{format_metric(r.get('attention_speedup'), '.2f')}x | "
                     f"{_optional(r.get('kernel_speedup'), '.2f', 'x')} | {r['executed_density']:.1%} |")
    return lines


def _forwards(result: dict) -> str:
    """How a speed result's forward seconds were taken (results before 2026-12-08 do not record their rounds)."""
    rounds, per_round = result.get("rounds"), result.get("forwards_per_round")
    if rounds is None:
        return "its forwards, each configuration timed in turn"
    if rounds > 1:
        return f"{rounds} interleaved rounds (dense, then each plan, one forward each)"
    return f"{per_round} forward{'' if per_round == 1 else 's'} per configuration, each configuration timed in turn"


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
    lines = titled_table(f"**Kernels: block-sparse attention vs dense baselines** (`dit-sparse bench kernels`; "
                         f"{_gpu_versions(result['environment'])}; random layouts, B=1; file "
                         f"`{path.relative_to(ROOT)}`)",
                         "H", "D", "S", "impl", "density", "ms", "TFLOP/s dense-equiv.", "linearity",
                         "speedup vs SDPA flash", "mask estimation / dense", "fp8 kernel speedup", "backward ms")
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
    lines = titled_table(f"**Mask estimation vs dense attention** (`python benchmarks/bench_mask_estimation.py`; "
                         f"{_gpu_versions(result['environment'])}; H={shape['heads']}, D={shape['head_dim']}, "
                         f"S={shape['seq']}, {shape['dtype']}, blocks {shape['block_q']}x{shape['block_k']}; "
                         f"file `{path.relative_to(ROOT)}`)",
                         "piece", "ms", "share of dense SDPA")
    lines += [f"| {MASK_ESTIMATION_PIECES.get(name, name)} | {value:.3f} | {value / dense:.1%} |"
              for name, value in ms.items()]
    return lines


def render_tiles(path: Path, result: dict) -> list[str]:
    """benchmarks/bench_tiles.py: the forward kernel per tile, density and variant, beside dense SDPA."""
    shape = result["shape"]
    dense = ", ".join(f"{name} {value:.2f} ms" for name, value in result["dense_ms"].items())
    lines = titled_table(f"**Forward kernel per tile** (`python benchmarks/bench_tiles.py`; "
                         f"{_gpu_versions(result['environment'])}; H={shape['heads']}, D={shape['head_dim']}, "
                         f"S={shape['seq']}, {shape['dtype']}, layout blocks {shape['block_q']}x{shape['block_k']}; "
                         f"dense: {dense}; file `{path.relative_to(ROOT)}`)",
                         "tile", "density", "variant", "ms", "speedup vs dense", "speedup vs 16-bit", "autotuned")
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
    window = f"+/-{w['frames']} frame, +/-{w['rows']} x +/-{w['cols']} tokens"
    title = (f"**tiny-shapes attention structure** (`python -m dit_sparse.zoo.attention_report`; share of "
             f"self-attention heads with >= {result['threshold']:.0%} of their mass inside {window}, a window holding "
             f"{result['window_fraction_of_keys']:.1%} of the keys; {len(result['prompts'])} held-out prompts, every "
             f"step and CFG branch; file `{path.relative_to(ROOT)}`; maps: `docs/attention_maps.png`)")
    lines = titled_table(title, "layer", "share of local heads", "share of local head-calls",
                         "mean local mass per head")
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
