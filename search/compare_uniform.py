"""Searched plans against the best uniform single-strategy plans at equal attention density.

For every uniform candidate of a search (one strategy on every head), the solver is asked again, from the same
statistics, for the most faithful plan at that candidate's predicted density (with ``--pick-by-psnr``, as
``dit-sparse search --pick-by-psnr`` does: the plan of several error models with the highest PSNR on the
calibration prompts, which are not the held-out prompts compared here); both run end to end on held-out
prompts against dense with the same seeds (``dit_sparse.evaluation``: PSNR, SSIM, caption accuracy, measured
attention and total speedup, executed density). Writes ``compare.json``, ``compare.md`` and
``psnr_vs_density.png``.

    python -m dit_sparse.search.compare_uniform --stats out/search/tiny-shapes.stats.json \\
        --plan out/search/tiny-shapes.plan.json --prompts 5 --out benchmarks/results/search-tiny-shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from dit_sparse.atomic import write_json, write_text
from dit_sparse.metrics import format_metric
from dit_sparse.plan import Schedule, SparsePlan

from .cost import CostModel, flop_cost
from .errors import BudgetError
from .problem import candidate_density, refresh_share
from .solver import Budget, InfeasibleBudget, evaluate_plan, solve
from .stats import CalibrationStats


def uniform_plans(stats: CalibrationStats, dense_first: float) -> list[tuple[str, SparsePlan, float]]:
    """(label, plan, predicted density in sparse steps) for every shared sparse candidate of the search; a
    re-scaled one's density counts its dense refreshes."""
    out = []
    heads = stats.fingerprint.num_heads
    num_steps = int(stats.info.get("num_steps", 1))
    interval = int(stats.info.get("refresh_interval", 5))
    share = refresh_share(num_steps - int(round(dense_first * num_steps)), interval)
    for ci, cand in enumerate(stats.candidates):
        if cand.per_head or not cand.computes or cand.dense:
            continue
        modules = {name: (cand.spec,) * heads for name in stats.modules}
        plan = SparsePlan(stats.fingerprint, modules,
                          schedule=Schedule(dense_first=dense_first, refresh_interval=interval),
                          calibration={"source": f"uniform {cand.key}"})
        out.append((cand.key, plan, candidate_density(stats, ci, share)))
    return out


def searched_at(stats: CalibrationStats, cost: CostModel, density: float, dense_first: float,
                pick_with=None, dense_cache: dict | None = None) -> tuple[SparsePlan, dict[str, Any] | None]:
    """The searched plan at `density`, and the end-to-end check that picked it (with `pick_with`, a pipeline;
    `dense_cache` keeps its dense calibration clips across densities)."""
    budget = Budget(target_density=density)
    try:
        solution = solve(stats, cost, budget, dense_first=dense_first)
    except InfeasibleBudget as e:
        return e.closest.plan, None
    if pick_with is None:
        return solution.plan, None
    from .ladder import picked_solution

    solution, validation = picked_solution(pick_with, stats, cost, budget, dense_first,
                                           wall=stats.info.get("seconds_per_generation"), progress=False,
                                           dense_cache=dense_cache)
    return solution.plan, validation.to_json()


def _predicted(stats: CalibrationStats, cost: CostModel, plan: SparsePlan) -> dict[str, float] | None:
    """The search's own prediction for a plan (None when the plan uses strategies that were not calibrated)."""
    try:
        m = evaluate_plan(stats, cost, plan)
    except BudgetError:
        return None
    return {k: m[k] for k in ("relative_l2_error", "density", "attention_speedup")}


def compare(stats_path: str | Path, plan_path: str | Path | None = None, baseline: str | Path | None = None,
            model: str | None = None, prompts: int | list[str] = 5, seeds: tuple[int, ...] = (0,),
            steps: int | None = None,
            out: str | Path = "benchmarks/results/search-compare", families: list[str] | None = None,
            cost: str = "measured", progress: bool = True, sweep: bool = True,
            pick_by_psnr: bool = False) -> dict[str, Any]:
    from dit_sparse.evaluation import run_e2e

    stats = CalibrationStats.load(stats_path)
    model = model or stats.info.get("model") or "tiny-shapes"
    dense_first = float(stats.info.get("dense_first", 0.2))
    cost_model = CostModel.from_json(stats.cost) if stats.cost and cost == "measured" else \
        flop_cost(stats.candidates, stats.grid, stats.block_q, stats.block_k, stats.fingerprint.num_heads,
                  stats.fingerprint.head_dim)
    out = Path(out)
    plans_dir = out / "plans"
    pairs, specs = [], []
    pipe, dense_cache = None, {}
    if pick_by_psnr and sweep:
        from dit_sparse.models import load_model

        pipe = load_model(model, "cpu", torch.float32)
    from tqdm.auto import tqdm

    sweep_plans = uniform_plans(stats, dense_first) if sweep else []
    for i, (label, uniform, density) in enumerate(tqdm(sweep_plans, desc="searched plan per uniform density",
                                                       disable=not progress)):
        if families and uniform.heads_for(stats.modules[0])[0].strategy not in families:
            continue
        u_path, s_path = plans_dir / f"uniform-{i:02d}.plan.json", plans_dir / f"searched-{i:02d}.plan.json"
        uniform.save(u_path)
        searched, check = searched_at(stats, cost_model, density, dense_first, pipe, dense_cache)
        searched.save(s_path)
        pairs.append({"uniform": label, "predicted_density": density, "uniform_plan": str(u_path),
                      "searched_plan": str(s_path), "end_to_end_check": check,
                      "uniform_predicted": _predicted(stats, cost_model, uniform),
                      "searched_predicted": _predicted(stats, cost_model, searched)})
        specs += [str(u_path), str(s_path)]
    extra, extra_predicted = {}, {}
    for name, path in (("searched (--plan)", plan_path), ("baseline", baseline)):
        if path is not None:
            extra[name] = str(path)
            specs.append(str(path))
            extra_predicted[name] = _predicted(stats, cost_model, SparsePlan.load(path))
    prompt_list = list(prompts) if isinstance(prompts, list) else None
    result = run_e2e(model, specs, prompt_list, len(prompt_list) if prompt_list else prompts, list(seeds), steps,
                     progress=progress)
    by_plan = {r["plan"]: r for r in result["results"]}
    for pair in pairs:
        pair["uniform_result"] = by_plan[pair["uniform_plan"]]
        pair["searched_result"] = by_plan[pair["searched_plan"]]
        pair["searched_wins"] = bool(pair["searched_result"]["psnr"] > pair["uniform_result"]["psnr"])
    summary = {
        "benchmark": "search vs uniform at equal density",
        "stats": str(stats_path),
        "model": model,
        "weights_id": result.get("weights_id"),  # None for models other than tiny-shapes
        "prompts": result["prompts"],
        "seeds": list(seeds),
        "dense_first": dense_first,
        "pick_by_psnr": bool(pick_by_psnr),
        "cost_model": cost_model.kind,
        "hardware": result["hardware"],
        "versions": result["versions"],
        "date": result["date"],
        "dense": by_plan["dense"],
        "pairs": pairs,
        "extra": {name: dict(by_plan[path], predicted=extra_predicted[name]) for name, path in extra.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", markdown(summary))
    _plot(summary, out / "psnr_vs_density.png")
    return summary


def markdown(summary: dict[str, Any]) -> str:
    f = format_metric
    hw = summary["hardware"]
    lines = [
        f"Searched vs uniform plans on {summary['model']}: {summary['prompts']} prompts x "
        f"{len(summary['seeds'])} seeds, dense first {summary['dense_first']:.0%} of steps, cost model "
        f"{summary['cost_model']}; {hw.get('gpu') or hw.get('processor') or hw.get('machine')}, {hw['cpus']} CPUs, "
        f"{hw['torch_threads']} torch threads; torch {summary['versions']['torch']}, diffusers "
        f"{summary['versions']['diffusers']}. Dense caption accuracy "
        f"{f(summary['dense']['caption_accuracy'], '.0%')}."
        + (" Searched plans: --pick-by-psnr (the highest mean PSNR on the calibration prompts among the plans of "
           "several error models at that density)." if summary.get("pick_by_psnr") else ""),
        "",
        "| uniform strategy | predicted density | predicted rel. L2 error (uniform / searched) | executed density "
        "(uniform / searched) | PSNR dB (uniform / searched) | SSIM (uniform / searched) | caption acc. (uniform / "
        "searched) | attention speedup (uniform / searched) | total speedup (uniform / searched) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["pairs"]:
        u, s = p["uniform_result"], p["searched_result"]
        win = "**" if p["searched_wins"] else ""
        pu, ps = p.get("uniform_predicted") or {}, p.get("searched_predicted") or {}
        lines.append(
            f"| `{p['uniform']}` | {p['predicted_density']:.1%} | {f(pu.get('relative_l2_error'), '.3f')} / "
            f"{f(ps.get('relative_l2_error'), '.3f')} | {f(u['executed_density'], '.1%')} / "
            f"{f(s['executed_density'], '.1%')} | {f(u['psnr'], '.1f')} / {win}{f(s['psnr'], '.1f')}{win} | "
            f"{f(u['ssim'], '.3f')} / {f(s['ssim'], '.3f')} | {f(u['caption_accuracy'], '.0%')} / "
            f"{f(s['caption_accuracy'], '.0%')} | {f(u['attention_speedup'], '.2f')}x / "
            f"{f(s['attention_speedup'], '.2f')}x | {f(u['speedup'], '.2f')}x / {f(s['speedup'], '.2f')}x |")
    if summary["extra"]:
        lines += ["", "| plan | predicted rel. L2 error | predicted attention speedup | executed density | PSNR dB | "
                  "SSIM | caption acc. | attention speedup | total speedup |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in summary["extra"].items():
            pr = r.get("predicted") or {}
            lines.append(f"| {name} | {f(pr.get('relative_l2_error'), '.3f')} | "
                         f"{f(pr.get('attention_speedup'), '.2f')}x | {f(r['executed_density'], '.1%')} | "
                         f"{f(r['psnr'], '.1f')} | "
                         f"{f(r['ssim'], '.3f')} | {f(r['caption_accuracy'], '.0%')} | "
                         f"{f(r['attention_speedup'], '.2f')}x | {f(r['speedup'], '.2f')}x |")
    wins = sum(p["searched_wins"] for p in summary["pairs"])
    lines += ["", f"The searched plan has the higher PSNR at {wins} of {len(summary['pairs'])} densities."]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from dit_sparse.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, marker, label in (("uniform_result", "o", "uniform"), ("searched_result", "*", "searched")):
        xs = [p[key]["executed_density"] for p in summary["pairs"]]
        ys = [min(p[key]["psnr"], 99.0) for p in summary["pairs"]]
        ax.scatter(xs, ys, marker=marker, label=label, s=60 if marker == "*" else 30)
    for p in summary["pairs"]:
        ax.plot([p["uniform_result"]["executed_density"], p["searched_result"]["executed_density"]],
                [min(p["uniform_result"]["psnr"], 99), min(p["searched_result"]["psnr"], 99)], color="#bbbbbb",
                lw=0.7, zorder=0)
    ax.set_xlabel("executed attention density (whole generation)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(f"{summary['model']}: searched vs uniform at equal density", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_sparse.search.compare_uniform", description=__doc__.split("\n")[0])
    p.add_argument("--stats", required=True, help="statistics file written by `dit-sparse search`")
    p.add_argument("--plan", default=None, help="the searched plan to report as well")
    p.add_argument("--baseline", default=None, help="another plan to report (e.g. the hand-made default)")
    p.add_argument("--no-pairs", action="store_true", help="only the --plan and --baseline plans, no uniform sweep")
    p.add_argument("--model", default=None, help="default: the model of the statistics")
    p.add_argument("--prompts", type=int, default=5, help="number of held-out prompts")
    p.add_argument("--prompt-file", default=None, help="prompts to use instead, one per line")
    p.add_argument("--seeds", default="0", help="comma-separated generation seeds")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--families", default=None, help="comma-separated strategy families to compare (default all)")
    p.add_argument("--cost", choices=("measured", "flop"), default="measured")
    p.add_argument("--pick-by-psnr", action="store_true",
                   help="pick each searched plan end to end on the calibration prompts (see dit-sparse search)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/search-compare")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompts
    if args.prompt_file:
        from .files import read_prompts

        prompts = read_prompts(args.prompt_file)
    summary = compare(args.stats, args.plan, args.baseline, args.model, prompts,
                      tuple(int(s) for s in args.seeds.split(",")), args.steps, args.out,
                      args.families.split(",") if args.families else None, args.cost, sweep=not args.no_pairs,
                      pick_by_psnr=args.pick_by_psnr)
    print(markdown(summary))
    print(f"wrote {Path(args.out) / 'compare.json'}, compare.md and psnr_vs_density.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
