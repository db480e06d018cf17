"""Pictures for the demo page: the dense/sparse difference heat map and the layer x head map of a plan.

matplotlib's object API only (no pyplot state), so pictures can be drawn from several threads at once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..layout import Grid
from ..plan import HeadStrategy, SparsePlan
from ..strategies.base import BuildContext

SHORT = {"dense": "dense", "skip": "skip", "diagonal": "diag", "multi_diagonal": "m-diag",
         "vertical_stripe": "stripe", "block_adaptive": "adapt", "pyramid": "pyr", "reuse": "reuse"}
MAX_HEATMAP_FRAMES = 8
DENSITY_BLOCK = 128  # block size at which static densities are counted (as dit_sparse.summary does)
_SAVE_LOCK = threading.Lock()  # matplotlib's font and text caches are shared: one picture is saved at a time


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def difference_heatmap(dense: np.ndarray, sparse: np.ndarray, path: Path) -> Path:
    """|dense - sparse| averaged over colour, one panel per frame (at most 8, evenly spaced), one colour scale."""
    diff = np.abs(np.asarray(dense, dtype=np.float32) - np.asarray(sparse, dtype=np.float32)).mean(axis=-1)
    frames = np.unique(np.linspace(0, len(diff) - 1, min(len(diff), MAX_HEATMAP_FRAMES)).round().astype(int))
    vmax = max(float(diff.max()), 1e-6)
    fig = _figure(1.1 * len(frames) + 1.2, 1.9)
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    image = None
    for ax, t in zip(axes, frames):
        image = ax.imshow(diff[t], cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"frame {t}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02).ax.tick_params(labelsize=7)
    fig.text(0.45, -0.02, f"|dense - sparse| per pixel (values in [0, 1]): mean {diff.mean():.4f}, "
             f"max {diff.max():.4f}", ha="center", va="top", fontsize=9)
    with _SAVE_LOCK:
        fig.savefig(path, bbox_inches="tight", pad_inches=0.3)
    return Path(path)


def head_density(spec: HeadStrategy, grid: Grid | None) -> float | None:
    """Expected fraction of dense attention work of one head at `grid` (None: dynamic, or no grid)."""
    strategy = spec.impl
    if not strategy.computes:
        return 0.0
    if strategy.dense:
        return 1.0
    if strategy.dynamic or grid is None:
        return None
    return float(strategy.layout(spec.param_dict, BuildContext(grid, DENSITY_BLOCK, DENSITY_BLOCK)).density())


def plan_picture(plan: SparsePlan, module_names: list[str], grid: Grid | None, path: Path, title: str = "plan") -> Path:
    """Layer x head map: colour is the head's expected attention density at `grid`, text its strategy.

    Layers the schedule keeps dense are drawn dense (marked *); dynamic strategies (chosen per step from the
    attention itself) are drawn hatched grey with their parameters.
    """
    layers, heads = len(module_names), plan.model.num_heads
    density = np.full((layers, heads), np.nan)
    labels: list[list[str]] = [["" for _ in range(heads)] for _ in range(layers)]
    cache: dict[HeadStrategy, float | None] = {}
    dense_layers = set(plan.schedule.dense_layers)
    for i, name in enumerate(module_names):
        for h, spec in enumerate(plan.heads_for(name)):
            if i in dense_layers:
                density[i, h], labels[i][h] = 1.0, "dense*"
                continue
            if spec not in cache:
                cache[spec] = head_density(spec, grid)
            d = cache[spec]
            short = SHORT.get(spec.strategy, spec.strategy)
            if d is None:
                labels[i][h] = f"{short}\n{_dynamic_label(spec)}"
            else:
                density[i, h] = d
                labels[i][h] = f"{short}\n{100 * d:.0f}%"

    cell = 0.55 if heads <= 16 else max(0.12, 8.0 / heads)
    fig = _figure(min(14.0, 1.6 + heads * cell * 1.3), min(14.0, 1.3 + layers * cell))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#d0d0d0")  # dynamic heads (NaN) show the face colour, hatched
    image = ax.imshow(np.ma.masked_invalid(density), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    for i in range(layers):
        for h in range(heads):
            if np.isnan(density[i, h]):
                ax.add_patch(_hatch(h, i))
    if layers * heads <= 256:
        for i in range(layers):
            for h in range(heads):
                d = density[i, h]
                colour = "black" if np.isnan(d) or d > 0.6 else "white"
                ax.text(h, i, labels[i][h], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("head")
    ax.set_ylabel("layer (covered self-attention)")
    step = max(1, heads // 16)
    ax.set_xticks(range(0, heads, step))
    ystep = max(1, layers // 24)
    ax.set_yticks(range(0, layers, ystep))
    ax.set_yticklabels([str(i) for i in range(0, layers, ystep)])
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="expected density")
    known = density[~np.isnan(density)]
    sched = plan.schedule
    lines = [title]
    detail = f"dense steps: {sched.dense_steps_text()}"
    if sched.dense_layers:
        detail += f", layers {sorted(dense_layers)} dense (*)"
    if known.size:
        detail += f"; mean static density {known.mean():.0%}"
    if grid is not None:
        detail += f" at grid {grid.frames}x{grid.height}x{grid.width}"
    lines.append(detail)
    if np.isnan(density).any():
        lines.append("grey hatched: dynamic (chosen every step from the attention)")
    ax.set_title(lines[0], fontsize=9)
    ax.text(0.5, -0.2 - 0.02 * (layers > 8), "\n".join(lines[1:]), transform=ax.transAxes, ha="center", va="top",
            fontsize=8)
    with _SAVE_LOCK:
        fig.savefig(path, bbox_inches="tight", pad_inches=0.3)
    return Path(path)


# dynamic strategy -> its cell label: the one parameter that sets how much it keeps (others: "dynamic")
DYNAMIC_LABELS: dict[str, Callable[[dict[str, Any]], str]] = {
    "block_adaptive": lambda p: (f"top{p['topk']}" if p.get("topk") is not None
                                 else f"tau {p['tau']:g} cap {p['cap']:g}"),
    "pyramid": lambda p: f"band {p['bands'][-1]:g}",
}


def _dynamic_label(spec: HeadStrategy) -> str:
    label = DYNAMIC_LABELS.get(spec.strategy)
    return label(spec.param_dict) if label is not None else "dynamic"


def _hatch(h: int, i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((h - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="#b8b8b8", linewidth=0)
