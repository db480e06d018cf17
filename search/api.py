"""`search(model, config)`: calibrate a model on prompts (or load the statistics of an earlier search), solve for
the budget, check the plan end to end when asked, and write the plan, its report and the statistics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from dit_sparse.api import in_noise_units, noise_levels
from dit_sparse.models import DTYPES, TINY_SHAPES
from dit_sparse.plan import SparsePlan

from .config import SearchConfig
from .cost import CostModel, flop_cost, measure_cost
from .distributed import Processes, processes
from .errors import SearchError
from .files import check_out_folder, output_paths, prompt_list
from .ladder import picked_solution, validated_solution
from .pipeline import load_pipeline, model_fingerprint, pipeline_label
from .pipeline_calibration import calibrate_pipeline
from .progress import PROGRESS
from .solver import InfeasibleBudget, Solution, solve
from .stats import CalibrationStats
from .threads import cpu_threads
from .validation import Validation

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    plan: SparsePlan
    solution: Solution
    stats: CalibrationStats | None  # None for a reuse-schedule search, which calibrates nothing
    paths: dict[str, Path] = field(default_factory=dict)  # what was written: plan, report, png, stats
    closest: bool = False  # the budget was not met; this is the closest plan (`allow_closest`)


def search(model=None, config: SearchConfig | None = None) -> SearchResult:
    """Calibrate (or load `config.stats`), solve for the budget, write plan + report (+ statistics); see
    `SearchConfig` for every setting and `dit-sparse search` for the command.

    model: a model name (tiny-shapes, a pipeline folder or a hub id; None: tiny-shapes, or with `stats` the
    statistics' model) or a loaded pipeline. Raises SearchError on bad input and when the budget cannot be met
    (unless `config.allow_closest`). Under several launched processes (accelerate launch, torchrun) each
    calibrates its share of the prompts and only the first writes files; the others return empty `paths`.
    """
    config = config or SearchConfig()
    procs = processes(config.device)  # several under accelerate launch / torchrun; otherwise just this one
    # each process on its own GPU; only the first shows progress
    device, progress = procs.device(config.device), config.progress and procs.is_main
    if (device, progress) != (config.device, config.progress):
        config = replace(config, device=device, progress=progress)
    prompts = prompt_list(config.prompts)
    with cpu_threads(config.device, config.threads):
        return _search(model, config, prompts, procs)


def _search(model, config: SearchConfig, prompts: list[str] | None, procs: Processes) -> SearchResult:
    """The search proper; with several processes each calibrates its share, and only the first writes files."""
    pipe = None if model is None or isinstance(model, str) else model
    if config.stats is not None:
        st, cost_model, label, paths = _from_stats(None if pipe is not None else model, config, procs)
    else:
        label = pipeline_label(pipe) if pipe is not None else model or TINY_SHAPES
        paths = output_paths(config.out, label)
        if procs.is_main:  # a read-only or full folder is found now, not after the calibration (see _from_stats)
            check_out_folder(paths["plan"])
        pipe = pipe if pipe is not None else load_pipeline(label, config.device, config.dtype)
        st, cost_model = calibrate_pipeline(pipe, label, prompts, config, procs)
        if procs.is_main:
            st.save(paths["stats"])
        PROGRESS.info(f"statistics saved to {paths['stats']} (re-solve in seconds with `stats` {paths['stats']})")
    wall = st.info.get("seconds_per_generation")
    solution, closest = _solved(st, cost_model, config, wall, paths)
    if not procs.is_main:
        procs.barrier()
        return SearchResult(solution.plan, solution, st, {}, closest)
    validation = None
    if (config.min_psnr is not None or config.pick_by_psnr) and pipe is None:
        setting = "min_psnr" if config.min_psnr is not None else "pick_by_psnr"
        pipe = load_pipeline(label, config.device, config.dtype, check_first=False,
                             failure=f"`{setting}` generates with the model: ")
    if config.min_psnr is not None:
        solution, validation, closest = validated_solution(pipe, st, cost_model, config, wall)
    elif config.pick_by_psnr and not closest:
        solution, validation = picked_solution(
            pipe, st, cost_model, config.budget, config.dense_first, dense_layers=config.dense_layers, wall=wall,
            layer_weights=config.layer_weights, step_weights=config.step_weights, seed=config.seed,
            progress=config.progress)
    solution = _write(solution, st, cost_model, config, paths, closest, validation, pipe)
    procs.barrier()
    return SearchResult(solution.plan, solution, st, paths, closest)


def _from_stats(model: str | None, config: SearchConfig,
                procs: Processes) -> tuple[CalibrationStats, CostModel, str, dict[str, Path]]:
    """The statistics of `config.stats`, checked against `model` (a name; None: not checked) and the settings
    given, the cost model to solve with, the model's name and the output paths (no statistics written)."""
    st = CalibrationStats.load(config.stats)
    if model is not None:
        fingerprint, _ = model_fingerprint(model)
        st.check_model(fingerprint, repr(model))
    known_names = {"steps": "num_steps", "refresh-interval": "refresh_interval"}
    for name, value in (("height", config.height), ("width", config.width), ("frames", config.frames),
                        ("steps", config.steps), ("refresh-interval", config.refresh_interval)):
        known = st.info.get(known_names.get(name, name))
        if value is not None and known is not None and value != known:
            # Worded with the flags: tests that call search() assert this text.
            raise SearchError(f"--{name} {value} differs from the statistics ({known}); calibrate again at "
                              f"this setting or leave --{name} out")
    label = model or st.info.get("model") or "the model"
    paths = output_paths(config.out, label)
    paths.pop("stats")
    if procs.is_main:  # the only one that writes: processes that probed the folder at once raced on creating it
        check_out_folder(paths["plan"])
    cost_model = procs.broadcast(_cost_for_stats(st, config) if procs.is_main else None)
    return st, cost_model, label, paths


def _cost_for_stats(st: CalibrationStats, config: SearchConfig) -> CostModel:
    """The cost model the statistics were solved with, when of the kind asked; else a new one."""
    if st.cost is not None and st.cost.get("kind") == config.cost:
        return CostModel.from_json(st.cost)
    fp = st.fingerprint
    if config.cost == "flop":
        return flop_cost(st.candidates, st.grid, st.block_q, st.block_k, fp.num_heads, fp.head_dim)
    return measure_cost(st.candidates, st.grid, st.block_q, st.block_k, int(st.info.get("batch") or 1), fp.num_heads,
                        fp.head_dim, config.device, DTYPES[config.dtype], st.info.get("executor"), config.cache_dir,
                        progress=config.progress)


def _solved(st: CalibrationStats, cost_model: CostModel, config: SearchConfig, wall: float | None,
            paths: dict[str, Path]) -> tuple[Solution, bool]:
    """The plan for the budget, and whether it is only the closest one (`allow_closest`)."""
    try:
        solution = solve(st, cost_model, config.budget, dense_first=config.dense_first,
                         dense_layers=config.dense_layers, wall_seconds=wall, layer_weights=config.layer_weights,
                         step_weights=config.step_weights)
    except InfeasibleBudget as e:
        if not config.allow_closest:
            hint = f"; statistics are in {paths['stats']}" if "stats" in paths else ""
            raise SearchError(f"{e}. No plan written (pass `allow_closest` to write the closest plan){hint}") \
                from None
        PROGRESS.warning(f"{e}; writing the closest plan (`allow_closest`)")
        return e.closest, True
    except ValueError as e:
        raise SearchError(str(e)) from None
    return solution, False


def _write(solution: Solution, st: CalibrationStats, cost_model: CostModel, config: SearchConfig,
           paths: dict[str, Path], closest: bool, validation: Validation | None, pipe) -> Solution:
    """Write the plan (its dense steps in noise levels where the step grid is known) and the report; drops the
    PNG from `paths` when it could not be drawn. Returns the solution as written."""
    from .report import write_report

    levels = st.info.get("noise_levels") or (noise_levels(pipe, st.info["num_steps"])
                                             if pipe is not None else None)
    if levels is not None:
        solution = replace(solution, plan=in_noise_units(solution.plan, levels))
    else:  # statistics from before noise levels were recorded, re-solved without loading the model
        logger.warning("the statistics do not record the step grid's noise levels: the plan's dense steps stay "
                       "counted in steps, which only apply(pipe, plan) can follow; calibrate again to write them in "
                       "noise levels")
    solution.plan.save(paths["plan"])
    written = write_report(solution, st, cost_model, paths["report"], paths["png"], plan_path=paths["plan"],
                           budget=config.budget, closest=closest, validation=validation)
    if "png" not in written:
        paths.pop("png")
    return solution
