"""The cost model: predicted attention time of every candidate at the model's real shape on this machine.

Measured (the default): each candidate runs through the executor that will run it (``cpu`` on CPU, Triton on
CUDA) on random q, k, v of the real shape, once for a group of all heads and once for half of them, so that
``time(group of g heads) = overhead + g * per_head`` separates the launch overhead of a head group from the
per-head work. Dynamic candidates add their mask estimation (timed the same way) and run at whatever density
calibration measured, through a linear fit ``per_head = a + b * density`` of the executor's static timings
(plus what a dynamic layout's execution costs beyond that fit, e.g. pooling). Re-scaled candidates are timed on
their path between refreshes (the layout plus the re-scaling and the residual); the solver adds their refreshes.
Tables are cached per device, shape, dtype, executor and torch version as JSON under ``~/.cache/dit_sparse/cost/``.

FLOP (``cost="flop"``): per-head time proportional to density, in units of one dense head, plus a fixed launch
overhead per group and the estimation work of dynamic candidates; no timing, fully reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_sparse.atomic import write_json
from dit_sparse.attend import rescaled_output
from dit_sparse.dense import dense_attention_lse
from dit_sparse.executors import get_executor
from dit_sparse.layout import Grid, num_blocks
from dit_sparse.strategies import BuildContext, get_strategy
from dit_sparse.strategies.dense import full_layout

from .candidates import Candidate

logger = logging.getLogger(__name__)

COST_VERSION = 3
# FLOP model constants, in units of one head's dense attention: a group launch, and fixed mask-estimation work.
FLOP_LAUNCH = 0.02
FLOP_ESTIMATE = 0.01
FLOP_POOLING = 0.005


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dit_sparse"


@dataclass
class CostModel:
    """Per call of one attention module (batch as calibrated). Times in `unit` (seconds, or dense heads)."""

    kind: str
    unit: str
    per_head: dict[str, float]  # shared static candidates and dense: time per head
    overhead: dict[str, float]  # per head-group launch, by candidate key
    estimate: dict[str, float]  # dynamic candidates: mask estimation per head
    extra: dict[str, float]  # dynamic candidates: execution per head beyond the density fit
    fit: tuple[float, float]  # executor time per head = fit[0] + fit[1] * density
    exec_overhead: float  # group launch of the executor (per-head layouts use it)
    dense_layer: float  # one call with every head dense
    meta: dict[str, Any] = field(default_factory=dict)

    def head_time(self, cand: Candidate, density: float) -> float:
        if not cand.computes:
            return 0.0
        if cand.per_head:
            return self.fit[0] + self.fit[1] * density
        if cand.dynamic:
            return self.estimate[cand.key] + self.fit[0] + self.fit[1] * density + self.extra.get(cand.key, 0.0)
        return self.per_head[cand.key]

    def group_overhead(self, cand: Candidate) -> float:
        if not cand.computes:
            return 0.0
        if cand.per_head:
            return self.exec_overhead
        return self.overhead[cand.key]

    def covers(self, candidates: list[Candidate]) -> bool:
        for c in candidates:
            if not c.computes or c.per_head:
                continue
            if c.key not in self.overhead or (c.dynamic and c.key not in self.estimate) or \
                    (not c.dynamic and c.key not in self.per_head):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit"] = list(self.fit)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        data = dict(data)
        data["fit"] = tuple(data["fit"])
        return cls(**data)


# -- FLOP model --------------------------------------------------------------------------------------------------
def flop_cost(candidates: list[Candidate], grid: Grid, block_q: int, block_k: int, num_heads: int,
              head_dim: int) -> CostModel:
    seq = grid.num_tokens
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    # Pooled q.k over blocks plus the self-similarity pass, relative to dense attention's S*S*D.
    estimate_work = (nq * nk * head_dim + 4 * seq * head_dim) / (seq * seq * head_dim) + FLOP_ESTIMATE
    per_head, overhead, estimate, extra = {}, {}, {}, {}
    for c in candidates:
        if not c.computes or c.per_head:
            continue
        overhead[c.key] = FLOP_LAUNCH
        if c.dynamic:
            estimate[c.key] = estimate_work
            extra[c.key] = FLOP_POOLING if c.pooled else 0.0
        elif c.dense:
            per_head[c.key] = 1.0
        else:
            per_head[c.key] = _static_layout(c, grid, block_q, block_k).density()
    return CostModel("flop", "dense heads", per_head, overhead, estimate, extra, (0.0, 1.0), FLOP_LAUNCH,
                     num_heads + FLOP_LAUNCH, {"grid": [grid.frames, grid.height, grid.width],
                                               "blocks": [block_q, block_k]})


def _static_layout(cand: Candidate, grid: Grid, block_q: int, block_k: int):
    if cand.dense:
        return full_layout(grid.num_tokens, block_q, block_k)
    return get_strategy(cand.family).layout(cand.spec.param_dict, BuildContext(grid, block_q, block_k))


# -- measured ------------------------------------------------------------------------------------------------------
def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or 'cpu'} x{os.cpu_count()} threads={torch.get_num_threads()}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cache_path(cache_dir: Path, device: torch.device, executor: str, batch: int, grid: Grid, heads: int,
               head_dim: int, dtype: torch.dtype, block_q: int, block_k: int) -> Path:
    name = (f"{device_description(device)}-{executor}-b{batch}-g{grid.frames}x{grid.height}x{grid.width}-h{heads}"
            f"-d{head_dim}-{str(dtype).replace('torch.', '')}-blk{block_q}x{block_k}-torch{torch.__version__}")
    return Path(cache_dir) / "cost" / f"{_slug(name)}.json"


class _Bench:
    """Named closures timed in interleaved rounds, keeping each one's minimum: on a machine shared with other
    work, interleaving spreads bursts of load over every entry and the minimum is the least disturbed run."""

    def __init__(self, device: torch.device, rounds: int):
        self.device, self.rounds = device, rounds
        self.items: dict[str, Any] = {}

    def add(self, name: str, fn) -> None:
        self.items[name] = fn

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, progress: bool = False, budget_s: float = 30.0) -> dict[str, float]:
        """At least 3 and at most `rounds` timed rounds, stopping after 3 once `budget_s` is spent."""
        best = {name: float("inf") for name in self.items}
        bar = None
        if progress and self.items:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.rounds, desc=f"timing {len(self.items)} kernels", unit="round")
        start_all = time.perf_counter()
        for r in range(self.rounds + 1):
            if r > 3 and time.perf_counter() - start_all > budget_s:
                break
            for name, fn in self.items.items():
                self._sync()
                start = time.perf_counter()
                fn()
                self._sync()
                if r:  # round 0 warms up (allocations, layout caches, autotuning)
                    best[name] = min(best[name], time.perf_counter() - start)
            if bar is not None and r:
                bar.update()
        if bar is not None:
            bar.close()
        return best


def _split(t_all: float, t_part: float, heads: int) -> tuple[float, float]:
    """(overhead, per_head) with overhead + heads * per_head = t_all, from a group of all heads and one of
    half of them (both large enough to run the same multi-threaded code path)."""
    part = max(1, heads // 2)
    if heads <= 1:
        return 0.0, t_all
    per_head = min(max((t_all - t_part) / (heads - part), 0.05 * t_all / heads), t_all / heads)
    return t_all - heads * per_head, per_head


def measure_cost(candidates: list[Candidate], grid: Grid, block_q: int, block_k: int, batch: int, num_heads: int,
                 head_dim: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 executor: str | None = None, cache_dir: str | os.PathLike | None = None, rounds: int = 10,
                 progress: bool = False) -> CostModel:
    """Time every candidate at this shape (reusing and extending the cached table)."""
    device = torch.device(device)
    ex = get_executor(executor, device)
    path = cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), device, ex.name, batch, grid,
                      num_heads, head_dim, dtype, block_q, block_k)
    table = _load_cache(path)
    if table is not None and table.covers(candidates):
        logger.info("cost table from cache %s", path)
        return table
    gen = torch.Generator(device="cpu").manual_seed(0)
    seq = grid.num_tokens
    q, k, v = (torch.randn(batch, seq, num_heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    one = tuple(x[:, :, : max(1, num_heads // 2)].contiguous() for x in (q, k, v))
    bench = _Bench(device, rounds)
    ctx_all = BuildContext(grid, block_q, block_k, q, k)
    ctx_one = BuildContext(grid, block_q, block_k, one[0], one[1])

    def pair(name, fn):
        bench.add(f"{name}|all", lambda: fn(q, k, v, ctx_all))
        bench.add(f"{name}|one", lambda: fn(*one, ctx_one))

    fit_layouts = {}
    if table is None:
        pair("dense", lambda q_, k_, v_, c_: dense_attention_lse(q_, k_, v_))
        fit_layouts = _fit_layouts(grid, block_q, block_k)
        for density, layout in fit_layouts.items():
            pair(f"fit:{density}", lambda q_, k_, v_, c_, lay=layout: ex.run(q_, k_, v_, lay))
    todo = [c for c in candidates if c.computes and not c.per_head and (table is None or c.key not in table.overhead)]
    todo = [c for c in todo if not (c.dense and not c.fp8)]
    # What a re-scaled head applies between refreshes: an in-layout share of mass per row and a residual.
    cached = {x.shape[2]: (torch.rand(batch, x.shape[2], seq, device=device) * 0.5 + 0.5,
                           torch.zeros(batch, seq, x.shape[2], head_dim, device=device)) for x in (q, one[0])}

    def runner(cand: Candidate, layout):
        if not cand.rescale:
            return lambda q_, k_, v_: ex.run(q_, k_, v_, layout, fp8=cand.fp8)
        return lambda q_, k_, v_: rescaled_output(*ex.run(q_, k_, v_, layout, fp8=cand.fp8), *cached[q_.shape[2]])

    dyn_layouts = {}
    for cand in todo:
        if cand.dynamic:
            strategy, params = get_strategy(cand.family), cand.spec.param_dict
            pair(f"est:{cand.key}", lambda q_, k_, v_, c_, s=strategy, p=params: s.layout(p, c_))
            layout = strategy.layout(params, ctx_all)
            dyn_layouts[cand.key] = layout
            run_fn = runner(cand, layout)
            bench.add(f"run:{cand.key}|all", lambda fn=run_fn: fn(q, k, v))
        else:
            layout = _static_layout(cand, grid, block_q, block_k)
            run_fn = runner(cand, layout)
            pair(f"run:{cand.key}", lambda q_, k_, v_, c_, fn=run_fn: fn(q_, k_, v_))
    times = bench.run(progress)

    def split(name):
        return _split(times[f"{name}|all"], times[f"{name}|one"], num_heads)

    if table is None:
        o, p = split("dense")
        # One launch overhead for every executor group: the median of the per-layout estimates (each a
        # difference of two timings, hence noisy), then per-head work from each layout's all-heads time.
        splits = [split(f"fit:{d}")[0] for d in fit_layouts]
        splits += [split(f"run:{c.key}")[0] for c in todo if not c.dynamic]
        # An overhead can be no larger than the cheapest group it is part of (guards against noisy timings).
        cheapest = min([times[f"fit:{d}|all"] for d in fit_layouts] +
                       [times[f"run:{c.key}|all"] for c in todo if not c.dynamic])
        exec_o = float(min(np.median(splits), 0.5 * cheapest))
        points = [[d, max(times[f"fit:{d}|all"] - exec_o, 0.0) / num_heads] for d in fit_layouts]
        table = CostModel("measured", "seconds", {"dense": p}, {"dense": o}, {}, {}, _fit(points), exec_o,
                          times["dense|all"],
                          {"device": device_description(device), "executor": ex.name, "batch": batch,
                           "grid": [grid.frames, grid.height, grid.width], "heads": num_heads,
                           "head_dim": head_dim, "dtype": str(dtype), "blocks": [block_q, block_k],
                           "torch": torch.__version__, "version": COST_VERSION, "fit_points": points,
                           "rounds": rounds, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    exec_o = table.exec_overhead
    for cand in todo:
        if cand.dynamic:
            o_est, p_est = split(f"est:{cand.key}")
            layout = dyn_layouts[cand.key]
            per_head_run = max(times[f"run:{cand.key}|all"] - exec_o, 0.0) / num_heads
            table.estimate[cand.key] = p_est
            table.extra[cand.key] = max(0.0, per_head_run - (table.fit[0] + table.fit[1] * layout.density()))
            table.overhead[cand.key] = o_est + exec_o
        else:
            table.per_head[cand.key] = max(times[f"run:{cand.key}|all"] - exec_o, 0.0) / num_heads
            table.overhead[cand.key] = exec_o
    write_json(path, table.to_json())
    return table


def _fit_layouts(grid: Grid, block_q: int, block_k: int) -> dict[float, Any]:
    """Window layouts of several densities (and the full layout) for the executor's time-against-density fit."""
    out = {}
    diag = get_strategy("diagonal")
    layouts = [full_layout(grid.num_tokens, block_q, block_k)]
    for frames in sorted({0, max(1, grid.frames // 4)}):
        layouts.append(diag.layout({"window": (frames, 1.0, 1.0)}, BuildContext(grid, block_q, block_k)))
    for layout in layouts:
        out.setdefault(round(layout.density(), 6), layout)
    return out


def _fit(points: list[list[float]]) -> tuple[float, float]:
    xs, ys = np.array([x for x, _ in points]), np.array([y for _, y in points])
    if len(points) >= 2 and np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
    else:
        slope, intercept = ys[0] / max(xs[0], 1e-9), 0.0
    return float(max(intercept, 0.0)), float(max(slope, 0.0))


def _load_cache(path: Path) -> CostModel | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        table = CostModel.from_json(data)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
        logger.warning("ignoring unreadable cost cache %s", path)
        return None
    if table.meta.get("version") != COST_VERSION:
        return None
    return table
