"""The search report: markdown (settings, budget, predictions, trade-off, per-head table) and a PNG map of the
chosen strategy and density of every (layer, head). matplotlib is imported only here, and only when drawing."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from dit_sparse.atomic import atomic_path, write_text

from .cost import CostModel
from .problem import candidate_density, refresh_share
from .solver import Budget, Solution
from .stats import CalibrationStats
from .validation import Validation

logger = logging.getLogger(__name__)

FAMILY_COLOURS = {
    "dense": "#4d4d4d", "skip": "#ffffff", "diagonal": "#1f77b4", "multi_diagonal": "#2ca02c",
    "vertical_stripe": "#ff7f0e", "block_adaptive": "#9467bd", "pyramid": "#d62728", "reuse": "#8c564b",
}
SHORT = {"dense": "D", "skip": "skip", "diagonal": "diag", "multi_diagonal": "multi", "vertical_stripe": "stripe",
         "block_adaptive": "adapt", "pyramid": "pyr", "reuse": "reuse"}


def _fmt(x, spec: str = ".3f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def render_markdown(solution: Solution, stats: CalibrationStats, cost: CostModel, *, plan_path: Path | None = None,
                    png_name: str | None = None, budget: Budget | None = None, closest: bool = False,
                    validation: Validation | None = None) -> str:
    m = solution.metrics
    info = stats.info
    weights = m.get("layer_weights") or [1.0] * len(stats.modules)
    weighted = "" if all(w == 1.0 for w in weights) else ", layers weighted by measured sensitivity"
    if m.get("step_weights"):
        weighted += ", sampled steps weighted by measured sensitivity"
    step_sens = info.get("step_sensitivity")
    fp = stats.fingerprint
    plan = solution.plan
    lines = [f"# dit-sparse search report: {info.get('model', fp.transformer_class)}", ""]
    if closest:
        lines += ["> **The budget could not be met; this is the closest plan (written with --allow-closest).**", ""]
    lines += [
        f"- plan: `{plan_path}`" if plan_path else "- plan: (not written)",
        f"- model: {fp.transformer_class}, {fp.num_layers} covered layers x {fp.num_heads} heads, head dim "
        f"{fp.head_dim}",
        f"- calibration: {len(info.get('prompts') or [])} prompts, {info.get('num_steps')} steps (errors measured at "
        f"steps {info.get('sample_steps')}, both CFG branches: {', '.join(info.get('branches') or []) or 'n/a'}), "
        f"grid {stats.grid.frames}x{stats.grid.height}x{stats.grid.width} = {stats.grid.num_tokens} video tokens, "
        f"blocks {stats.block_q}x{stats.block_k}, executor `{info.get('executor')}` on {info.get('device')}, "
        f"query rows scored: {info.get('rows')}"
        + (f"; step sensitivities {', '.join(f'{step}: {v:.2f}' for step, v in step_sens)}" if step_sens else ""),
        f"- candidates per head: {len(stats.candidates)} ({', '.join(sorted({c.family for c in stats.candidates}))});"
        f" {_modifier_note(stats.candidates, info.get('refresh_interval'))}",
        f"- cost model: {cost.kind} ({cost.unit})"
        f"{' on ' + cost.meta.get('device', '') if cost.kind == 'measured' else ''}",
        f"- schedule: dense steps {plan.schedule.dense_steps_text()} ({m['dense_steps']} of {m['num_steps']}), "
        f"dense layers {list(plan.schedule.dense_layers) or 'none'}, dynamic layouts and re-scale statistics "
        f"refreshed every {plan.schedule.refresh_interval} steps",
        "",
        "## Budget",
        "",
        f"- asked: {budget.describe() if budget else 'default'}",
        f"- {solution.binding}",
        "",
        "## Predicted",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| attention-output relative L2 error (mean over layers, sparse steps{weighted}) | "
        f"{m['relative_l2_error']:.4f} |",
        f"| the same, every layer weighted alike | {m['unweighted_relative_l2_error']:.4f} |",
        f"| attention density during sparse steps | {m['density']:.1%} |",
        f"| attention work over the whole generation | {m['executed_density']:.1%} |",
        f"| attention speedup over the whole generation | {m['attention_speedup']:.2f}x |",
        f"| attention speedup during sparse steps | {m['sparse_step_attention_speedup']:.2f}x |",
        f"| end-to-end speedup | {_fmt(m['end_to_end_speedup'], '.2f')}"
        f"{'x' if m['end_to_end_speedup'] else ' (needs the measured cost model)'} |",
        "",
        "What the budget cost in fidelity: the plan changes each covered layer's attention output by the relative "
        "L2 error below (dense = 0); the whole plan by "
        f"{m['unweighted_relative_l2_error']:.4f} on average over layers during the sparse steps"
        + (f" ({m['relative_l2_error']:.4f} with each layer weighted by how much a change of its attention output "
           "changes the transformer output, which is what the budget limits)." if weighted else "."),
        "",
        "## Speed against fidelity (fastest plan for each error budget)",
        "",
        "| max relative L2 error | achieved | attention speedup | density |",
        "|---|---|---|---|",
    ]
    for pt in solution.frontier:
        lines.append(f"| {pt['max_error']:.3g} | {pt['relative_l2_error']:.4f} | {pt['attention_speedup']:.2f}x | "
                     f"{pt['density']:.1%} |")
    if validation is not None:
        lines += _validation_lines(validation)
    lines += _candidate_lines(solution, stats)
    lines += ["", "## Layers", "",
              "| layer | module | sensitivity weight | relative L2 error | density | head groups | strategies |",
              "|---|---|---|---|---|---|---|"]
    head_err = np.asarray(m["head_error"])
    head_dens = np.asarray(m["head_density"])
    for mi, name in enumerate(stats.modules):
        specs = plan.heads_for(name)
        counts = Counter(s.strategy + (" (re-scaled)" if s.rescale else "") for s in specs)
        lines.append(f"| {stats.layers[mi]} | `{name}` | {weights[mi]:.2f} | {m['layer_relative_l2_error'][mi]:.4f} | "
                     f"{head_dens[mi].mean():.1%} | {m['groups_per_layer'][mi]} | "
                     f"{', '.join(f'{n}x {s}' for s, n in counts.items())} |")
    if png_name:
        lines += ["", f"![layer x head map]({png_name})"]
    lines += ["", "## Heads", "", "| layer | head | strategy | density | relative L2 error (head, vs layer energy) |",
              "|---|---|---|---|---|"]
    for mi, name in enumerate(stats.modules):
        for hi, spec in enumerate(plan.heads_for(name)):
            lines.append(f"| {stats.layers[mi]} | {hi} | `{spec.describe()}` | {head_dens[mi, hi]:.1%} | "
                         f"{np.sqrt(max(head_err[mi, hi], 0.0)):.4f} |")
    return "\n".join(lines) + "\n"


def _candidate_lines(solution: Solution, stats: CalibrationStats) -> list[str]:
    """Each calibrated candidate's error and density over all heads, and how many heads the plan gives it."""
    m = solution.metrics
    share = refresh_share(m["num_steps"] - m["dense_steps"], solution.plan.schedule.refresh_interval)
    used = Counter(solution.assign.ravel().tolist()) if solution.assign is not None else Counter()
    lines = ["", "## Candidates", "",
             "Every candidate as calibrated, over all covered heads: relative L2 error of the attention output (mean "
             "over heads and sampled steps, layers alike) and density in sparse steps (a re-scaled candidate's "
             f"includes its dense refreshes: {share:.0%} of the sparse steps under this plan's schedule).", "",
             "| candidate | relative L2 error | density | heads in this plan |", "|---|---|---|---|"]
    for ci, cand in enumerate(stats.candidates):
        err = float(np.nanmean(stats.error[:, :, ci]))
        lines.append(f"| `{cand.key}` | {np.sqrt(max(err, 0.0)):.3f} | {candidate_density(stats, ci, share):.1%} | "
                     f"{used.get(ci, 0)} |")
    return lines


def _validation_lines(validation: Validation) -> list[str]:
    n = len(validation.prompts)
    if validation.min_psnr is None:
        lines = ["", "## End-to-end check (--pick-by-psnr)", "",
                 f"Every plan below meets the target; each generated the {n} calibration prompts (same seeds as "
                 f"dense), and the one with the highest mean PSNR against dense was kept.", "",
                 "| solver variant | predicted density | predicted speedup | mean PSNR | lowest PSNR | result |",
                 "|---|---|---|---|---|---|"]
        for t in validation.trials:
            lines.append(f"| {t.variant} | {t.solution.metrics['density']:.1%} | {t.predicted_speedup:.2f}x | "
                         f"{t.mean_psnr:.1f} dB | {min(t.psnr):.1f} dB | "
                         f"{'chosen' if t is validation.chosen else ''} |")
        return lines
    lines = ["", "## End-to-end check (--min-psnr)", "",
             f"Each plan below generated the {n} calibration prompts (same seeds as dense), in "
             f"order of predicted speed, until one reached a mean PSNR of {validation.min_psnr:g} dB against dense.",
             "", "| dense first | max relative L2 error | solver | predicted speedup | mean PSNR | lowest PSNR | "
             "result |",
             "|---|---|---|---|---|---|---|"]
    for t in validation.trials:
        result = "chosen" if t is validation.chosen else "below the bar"
        lines.append(f"| {t.dense_first:.0%} | {t.max_error:g} | {t.variant or 'all strategies'} | "
                     f"{t.predicted_speedup:.2f}x | {t.mean_psnr:.1f} dB | {min(t.psnr):.1f} dB | {result} |")
    return lines


def render_png(solution: Solution, stats: CalibrationStats, path: Path) -> None:
    """Layer x head map: colour = strategy family, text = short name and density. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plan = solution.plan
    families = list(FAMILY_COLOURS)
    m, h = len(stats.modules), stats.fingerprint.num_heads
    grid = np.zeros((m, h), dtype=int)
    dens = np.asarray(solution.metrics["head_density"])
    for mi, name in enumerate(stats.modules):
        for hi, spec in enumerate(plan.heads_for(name)):
            grid[mi, hi] = families.index(spec.strategy) if spec.strategy in families else 0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * h + 2.5), max(2.5, 0.45 * m + 1.5)), dpi=110)
    ax.imshow(grid, cmap=ListedColormap([FAMILY_COLOURS[f] for f in families]), vmin=-0.5,
              vmax=len(families) - 0.5, aspect="auto")
    for mi in range(m):
        for hi in range(h):
            fam = families[grid[mi, hi]]
            colour = "white" if fam in ("dense", "diagonal", "block_adaptive", "pyramid") else "black"
            ax.text(hi, mi, f"{SHORT[fam]}\n{dens[mi, hi]:.0%}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(h))
    ax.set_yticks(range(m))
    ax.set_yticklabels([str(layer) for layer in stats.layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(-0.5, h, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, m, 1), minor=True)
    ax.grid(which="minor", color="#bbbbbb", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    met = solution.metrics
    ax.set_title(f"{stats.fingerprint.transformer_class}: rel. L2 error {met['relative_l2_error']:.3f}, density "
                 f"{met['density']:.0%}, attention {met['attention_speedup']:.2f}x", fontsize=9)
    used = sorted({families[i] for i in np.unique(grid)}, key=families.index)
    ax.legend(handles=[Patch(facecolor=FAMILY_COLOURS[f], edgecolor="#888888", label=f) for f in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(solution: Solution, stats: CalibrationStats, cost: CostModel, md_path: Path, png_path: Path, *,
                 plan_path: Path | None = None, budget: Budget | None = None, closest: bool = False,
                 validation: Validation | None = None) -> dict[str, Path]:
    """Write the PNG (when matplotlib is installed) and the markdown; returns what was written."""
    written = {}
    png_name = None
    try:
        render_png(solution, stats, Path(png_path))
        written["png"] = Path(png_path)
        png_name = Path(png_path).name
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG map (pip install matplotlib)")
    text = render_markdown(solution, stats, cost, plan_path=plan_path, png_name=png_name, budget=budget,
                           closest=closest, validation=validation)
    written["report"] = write_text(md_path, text)
    return written


def _modifier_note(candidates, refresh_interval) -> str:
    fp8 = sum(c.fp8 for c in candidates)
    rescaled = sum(c.rescale for c in candidates)
    note = f"{fp8} fp8 variants (kept only where the cost model measured them faster; never on CPU)" if fp8 else \
        "no fp8 variants (kept only where the cost model measures them faster; never on CPU)"
    ages = f"0-{int(refresh_interval or 5) - 1}"
    note += (f"; {rescaled} re-scaled variants, scored over residual ages {ages} steps and charged a dense refresh"
             if rescaled else "; re-scaling not searched")
    if any(c.reuses for c in candidates):
        note += f"; `reuse` scored over output ages {ages} steps and charged a dense refresh"
    return note
