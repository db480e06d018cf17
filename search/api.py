"""`search(...)`: calibrate a model on prompts, solve for a budget, write the plan, its report and the statistics."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.api import apply, in_noise_units, noise_levels, remove, transformers_of
from dit_sparse.executors import get_executor
from dit_sparse.layout import Grid, num_blocks
from dit_sparse.plan import ModelFingerprint, SparsePlan

from .calibration import CalibrationObserver, history_steps, sample_steps
from .candidates import Candidate, default_candidates, with_fp8
from .cost import CostModel, flop_cost, measure_cost
from .distributed import Processes, processes
from .errors import SearchError
from .sensitivity import LayerSensitivity, StepSensitivity, measure_step_sensitivity, pipeline_output
from .solver import DEFAULT_MAX_ERROR, STEP_WEIGHTS, Budget, InfeasibleBudget, Solution, solve
from .stats import CalibrationStats
from .validation import (
    Validation,
    asked_model_first,
    candidate_trials,
    failure_message,
    highest_psnr,
    refreshing_variants,
    settings_ladder,
    solver_variants,
    validate,
    validated_note,
    variant_trials,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "a cat walking on grass",
    "waves crashing on a rocky shore at sunset",
    "a person riding a bicycle down a city street",
]
# Observer work per evaluated call, in units of one dense attention call over the sampled rows (measured on
# tiny-shapes on CPU); used only for the estimate printed before a run.
EVAL_COST_FACTOR = 5.0


@dataclass
class SearchResult:
    plan: SparsePlan
    solution: Solution
    stats: CalibrationStats
    paths: dict[str, Path] = field(default_factory=dict)
    closest: bool = False


# -- inputs ----------------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    from dit_sparse.inputs import InputFileError, read_text_file

    path = Path(path)
    try:  # a binary file, a device or a FIFO is one line naming it, not a UnicodeDecodeError or a hang
        text = read_text_file(path, "--prompts", "a text file with one prompt per line")
    except InputFileError as e:
        raise SearchError(str(e)) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SearchError(f"--prompts: {path} has no prompt (give one prompt per line)")
    return prompts


def default_prompts(pipe) -> list[str]:
    if type(pipe).__name__ == "TinyShapesPipeline":
        import random

        from dit_sparse.zoo.shapes_data import sample_attrs

        rng = random.Random(20240)
        return [sample_attrs(rng).caption for _ in range(4)]
    return list(DEFAULT_PROMPTS)


def output_paths(out: str | Path | None, model: str) -> dict[str, Path]:
    if out is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model)
        out = Path("out/search") / f"{name}.plan.json"
    out = Path(out)
    stem = out.name[: -len(".plan.json")] if out.name.endswith(".plan.json") else out.stem
    return {"plan": out, "report": out.with_name(f"{stem}.report.md"), "png": out.with_name(f"{stem}.report.png"),
            "stats": out.with_name(f"{stem}.stats.json")}


def check_out_folder(plan_path: Path) -> None:
    """Before any work: the plan's folder (where the report and statistics go too) can be created and written in."""
    from dit_sparse.atomic import WriteError, check_writable_folder

    try:
        check_writable_folder(Path(plan_path).parent, option="the folder of --out")
    except WriteError as e:
        raise SearchError(f"{e} (checked before any work; give a writable --out)") from None


def model_fingerprint(model: str) -> tuple[ModelFingerprint, list[tuple[str, int]]]:
    """Fingerprint and covered modules of a model from its configuration only (built on the meta device)."""
    from dit_sparse.checks import ArgumentError
    from dit_sparse.models import TINY_SHAPES, check_model_name

    try:  # a mistyped folder (./mymodel) is one line saying so, not the hub's error about repository ids
        model = check_model_name(model)
    except ArgumentError as e:
        raise SearchError(str(e)) from None
    if model == TINY_SHAPES:
        from dit_sparse.zoo import WEIGHTS_DIR

        if not (WEIGHTS_DIR / "model_index.json").is_file():
            raise SearchError(f"--model tiny-shapes: the shipped weights are missing from {WEIGHTS_DIR}; reinstall "
                              "dit-sparse or produce them with `python -m dit_sparse.zoo.train_tiny_shapes`")
        model = str(WEIGHTS_DIR)
    import importlib

    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model)
        # model_index.json names (library, class): "diffusers" for stock transformers, a module path for custom
        # ones such as tiny-shapes' TinyShapesTransformer (diffusers' own loader imports it the same way)
        library, class_name = index["transformer"]
        cls = getattr(importlib.import_module(library), class_name)
        config = cls.load_config(model, subfolder="transformer")
    except (OSError, KeyError, AttributeError, TypeError, ValueError, ImportError) as e:
        raise SearchError(f"--model: could not read the transformer configuration of {model!r}: {e}") from None
    with torch.device("meta"):
        transformer = cls.from_config(config)
    adapter = adapter_for_transformer(transformer)
    return adapter.fingerprint(transformer), adapter.covered_modules(transformer)


def _pipeline_defaults(pipe) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def call_settings(pipe, *, steps: int, guidance: float | None, height: int | None, width: int | None,
                  frames: int | None, output_type: str) -> dict[str, Any]:
    """Keyword arguments of one generation with the search's settings (None: the pipeline's default)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    for name, value in (("guidance_scale", guidance), ("height", height), ("width", width), ("num_frames", frames)):
        if value is not None:
            if name not in params:
                raise SearchError(f"{type(pipe).__name__} takes no {name!r}; leave that option out")
            kwargs[name] = value
    if "output_type" in params:
        kwargs["output_type"] = output_type
    return kwargs


def pipeline_runner(pipe, prompts: list[str], *, steps: int, guidance: float | None = None,
                    height: int | None = None, width: int | None = None, frames: int | None = None,
                    seed: int = 0) -> Callable[[int, Callable[[], None]], None]:
    """run(i, on_step): the i-th calibration generation (latents only, nothing decoded); returns the pipeline's
    output. ``run.counts_steps`` says whether on_step is called at the end of every step (the pipeline takes
    ``callback_on_step_end``) or only after the generation."""
    params = inspect.signature(pipe.__call__).parameters
    base = call_settings(pipe, steps=steps, guidance=guidance, height=height, width=width, frames=frames,
                         output_type="latent")

    def run(i: int, on_step: Callable[[], None]) -> None:
        kwargs = dict(base, prompt=prompts[i])
        if "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = lambda *_args: (on_step(), {})[1]
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        try:
            output = pipe(generator=generator, **kwargs)
        except ValueError as e:
            raise SearchError(f"the pipeline refused these settings: {e}") from None
        if "callback_on_step_end" not in params:
            for _ in range(steps):
                on_step()
        return output

    run.counts_steps = "callback_on_step_end" in params
    return run


# -- calibration -----------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    grid: Grid
    batch: int
    calls_per_step: float
    step_seconds: float


def probe(target, run_one_step: Callable[[], None]) -> Probe:
    """One denoising step with a dense plan: the video grid, batch per call, calls per step, time per step."""
    transformer = transformers_of(target)[0]
    processor = apply(target, SparsePlan.uniform(transformer, "dense"))
    seen: dict[str, Any] = {"calls": 0}
    first = adapter_for_transformer(transformer).covered_modules(transformer)[0][0]

    def observe(site, q, k, v, text):
        if site.module_name == first:
            seen["calls"] += 1
            seen["grid"], seen["batch"] = site.grid, q.shape[0]

    processor.observers.append(observe)
    try:
        start = time.perf_counter()
        run_one_step()
        seconds = time.perf_counter() - start
    finally:
        remove(target)
    if "grid" not in seen:
        raise SearchError("the pipeline never called a covered attention module; is this a supported model?")
    return Probe(seen["grid"], seen["batch"], float(seen["calls"]), seconds)


class _ModuleTimer:
    """Wall time inside the covered attention modules (projections included), the observer's own time excluded."""

    def __init__(self, observer: CalibrationObserver):
        self.observer = observer
        self.seconds = 0.0
        self.paused = False
        self._starts: dict[int, tuple[float, float]] = {}

    def attach(self, modules) -> list:
        handles = []
        for module in modules:
            handles.append(module.register_forward_pre_hook(self._pre))
            handles.append(module.register_forward_hook(self._post))
        return handles

    def _pre(self, module, args):
        if not self.paused:
            self._starts[id(module)] = (time.perf_counter(), self.observer.seconds)

    def _post(self, module, args, output):
        if id(module) in self._starts:
            start, observed = self._starts.pop(id(module))
            self.seconds += time.perf_counter() - start - (self.observer.seconds - observed)


def calibrate(target, run: Callable[[int, Callable[[], None]], None], num_samples: int, *, num_steps: int,
              grid: Grid, candidates: list[Candidate] | None = None, dense_first: float = 0.2,
              calib_steps: int = 5, refresh_interval: int = 5, executor: str | None = None,
              block_size: tuple[int, int] | None = None, device: str | torch.device = "cpu",
              progress: bool = True, max_rows: int = 4096, query_blocks: int = 8, seed: int = 0,
              sensitivity_samples: int = 1, step_sensitivity: bool = True, info: dict[str, Any] | None = None,
              procs: Processes | None = None) -> CalibrationStats:
    """Run `num_samples` generations (run(i, on_step)) with a dense plan and the calibration observer.

    target: what dit_sparse.apply takes (a pipeline or a transformer). Returns the statistics (no cost table).
    sensitivity_samples: during the first this-many generations, measure each layer's sensitivity (one extra
    transformer call per covered layer at every sampled step; 0 turns it off). step_sensitivity: generate the first
    prompt again once per sampled step with that step perturbed (see sensitivity.py; needs a `run` that returns
    the pipeline output and counts steps, like `pipeline_runner`'s). procs: with several processes,
    each runs its share of the generations and every process returns the statistics of all of them.
    """
    procs = procs or Processes()
    indices = procs.shard(num_samples)
    transformer = transformers_of(target)[0]
    adapter = adapter_for_transformer(transformer)
    fingerprint = adapter.fingerprint(transformer)
    covered = adapter.covered_modules(transformer)
    ex = get_executor(executor, torch.device(device))
    block_q, block_k = block_size or ex.block_sizes(torch.device(device), fingerprint.head_dim)
    candidates = candidates if candidates is not None else default_candidates(grid, block_q, block_k)
    steps = sample_steps(num_steps, dense_first, calib_steps)
    first_sparse = int(round(dense_first * num_steps))
    observer = CalibrationObserver([n for n, _ in covered], fingerprint.num_heads, candidates, block_q, block_k,
                                   steps, first_sparse, refresh_interval, max_rows=max_rows,
                                   query_blocks=query_blocks, seed=seed,
                                   reduce=procs.sum if procs.distributed else None,
                                   share_first=procs.from_first if procs.distributed else None)
    processor = apply(target, SparsePlan.uniform(transformer, "dense"), executor=executor, block_size=block_size)
    processor.observers.append(observer)
    bar = None
    if progress and procs.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices) * num_steps, desc="calibrating" + (f" (1 of {procs.world} processes)"
                   if procs.distributed else ""), unit="step", file=sys.stderr)
    wall, attention = [], []
    timer = _ModuleTimer(observer)
    handles = timer.attach([dict(t.named_modules())[name] for t in transformers_of(target) for name, _ in covered
                            if name in dict(t.named_modules())])
    sensitivity = None
    if sensitivity_samples > 0:
        modules = dict(transformer.named_modules())
        sensitivity = LayerSensitivity(transformer, [modules[name] for name, _ in covered], observer, set(steps),
                                       timer, seed=seed)
        handles.append(sensitivity.attach())
    measure_steps = step_sensitivity and getattr(run, "counts_steps", False)  # the same on every process
    reference, step_values = None, None
    try:
        for n, i in enumerate(indices):
            if sensitivity is not None:
                sensitivity.active = n < sensitivity_samples
            before, attn_before = observer.seconds, timer.seconds
            start = time.perf_counter()
            with torch.no_grad():
                output = run(i, bar.update if bar is not None else (lambda: None))
            wall.append(time.perf_counter() - start - (observer.seconds - before))
            attention.append(timer.seconds - attn_before)
            if n == 0 and measure_steps and output is not None:  # this process's first prompt
                reference = pipeline_output(output)
        if reference is not None:
            step_values = _step_sensitivity(transformer, run, indices[0], steps, reference, observer, timer,
                                            sensitivity, seed, progress and procs.is_main)
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
        remove(target)
    error, density, columns = observer.results()  # summed over processes: every process reaches this
    missing = [name for name, mi in observer.modules.items() if np.isnan(error[mi]).all()]
    if missing:
        raise SearchError(f"calibration never evaluated {', '.join(missing[:3])}: no call reached the sampled steps "
                          f"{steps} (does the pipeline run {num_steps} steps?)")
    calls = observer.calls_per_module.get(covered[0][0], 0)
    info = dict(info or {})
    info.update({
        "num_steps": num_steps,
        "sample_steps": steps,
        "dense_first": dense_first,
        "refresh_interval": refresh_interval,
        "calls_per_step": calls / max(1, len(indices) * num_steps),
        "batch": observer.batch,
        "branches": sorted(observer.branches),
        "executor": ex.name,
        # The first generation warms up; later ones are representative.
        "seconds_per_generation": sum(wall[1:] or wall) / len(wall[1:] or wall),
        "attention_seconds_per_generation": sum(attention[1:] or attention) / len(attention[1:] or attention),
        "observer_seconds": observer.seconds,
        "rows": "all" if grid.num_tokens <= max_rows else f"{query_blocks} query blocks per call",
        "layer_sensitivity": _merged_sensitivity(sensitivity, procs) if sensitivity is not None else None,
        "step_sensitivity": _merged_step_sensitivity(steps, step_values, procs) if measure_steps else None,
    })
    if procs.distributed:
        info["processes"] = procs.world
    sampled, step_error = observer.step_results()
    return CalibrationStats(fingerprint, [n for n, _ in covered], [layer for _, layer in covered], observer.grid,
                            block_q, block_k, candidates, error, density, columns, info,
                            step_error={step: step_error[si] for si, step in enumerate(sampled)
                                        if not np.isnan(step_error[si]).all()})


def _step_sensitivity(transformer, run, index: int, steps: list[int], reference, observer, timer, layer_sensitivity,
                      seed: int, progress: bool) -> list[float]:
    """The first generation again once per sampled step, that step perturbed; the books stay closed meanwhile."""
    perturb = StepSensitivity(transformer, seed=seed)
    handle = perturb.attach()
    observer.paused, timer.paused = True, True
    if layer_sensitivity is not None:
        layer_sensitivity.active = False
    if progress:
        print(f"step sensitivity: generating calibration prompt 1 again at {len(steps)} perturbed steps",
              file=sys.stderr)
    try:
        with torch.no_grad():
            return measure_step_sensitivity(run, index, steps, reference, perturb)
    finally:
        handle.remove()
        observer.paused, timer.paused = False, False


def _merged_step_sensitivity(steps: list[int], values: list[float] | None, procs: Processes):
    """[[step, sensitivity], ...] averaged over the processes that measured it."""
    measured = values is not None
    sums = procs.sum(np.asarray(values if measured else [0.0] * len(steps), dtype=np.float64))
    count = float(procs.sum(np.asarray([1.0 if measured else 0.0]))[0])
    return [[step, float(v / count)] for step, v in zip(steps, sums)] if count else None


def _merged_sensitivity(sensitivity: LayerSensitivity, procs: Processes) -> list[float] | None:
    sums = procs.sum(np.asarray(sensitivity.sums, dtype=np.float64))
    count = float(procs.sum(np.asarray([sensitivity.count], dtype=np.float64))[0])
    return (sums / count).tolist() if count else None


def _estimate(prb: Probe, prompts: int, steps: int, calib_steps: int, calls_per_step: float, layers: int,
              dense_layer: float | None, candidates: int, max_rows: int, query_blocks: int, block_q: int,
              heads: int, head_dim: int, dynamic: int, remembered: int = 0,
              kept: int = 0) -> tuple[float, float]:
    """(seconds, extra bytes) expected for calibration. remembered: steps that only keep re-scale statistics;
    kept: re-scaled candidates times the statistics kept for each (one per age)."""
    # the generations, plus the first prompt again once per sampled step (step sensitivity)
    seconds = prb.step_seconds * steps * (prompts + calib_steps)
    seq = prb.grid.num_tokens
    rows = seq if seq <= max_rows else min(seq, query_blocks * block_q)
    if dense_layer:
        evaluated = prompts * calib_steps * calls_per_step * layers
        seconds += evaluated * dense_layer * (rows / seq) * EVAL_COST_FACTOR * max(1.0, candidates / 20)
        seconds += prompts * remembered * calls_per_step * layers * dense_layer * (rows / seq) * EVAL_COST_FACTOR
    nk = num_blocks(seq, 128)
    stored = layers * max(1, int(calls_per_step)) * dynamic * prb.batch * heads * nk * nk
    stored += 4 * layers * max(1, int(calls_per_step)) * kept * prb.batch * heads * rows * (head_dim + 1)
    working = 4 * prb.batch * rows * heads * (2 * seq + 8 * nk * (head_dim + 1))
    return seconds, float(min(working, 4 * (1 << 26) * 3) + stored)


# -- the whole search -------------------------------------------------------------------------------------------------
def search(model: str | None = None, prompts: list[str] | str | Path | None = None, *, height: int | None = None,
           width: int | None = None, frames: int | None = None, steps: int | None = None,
           guidance: float | None = None, max_error: float | None = None, target_density: float | None = None,
           target_speedup: float | None = None, dense_first: float = 0.2, dense_layers: tuple[int, ...] = (),
           stats: str | Path | None = None, out: str | Path | None = None, device: str = "cpu",
           dtype: str = "float32", allow_closest: bool = False, cost: str = "measured",
           cache_dir: str | Path | None = None, calib_steps: int = 5, refresh_interval: int | None = None,
           seed: int = 0, progress: bool = True, threads: int | None = None, layer_weights: str = "sensitivity",
           echo: Callable[[str], None] | None = None, min_psnr: float | None = None, pick_by_psnr: bool = False,
           pipe=None, step_weights: str = "none") -> SearchResult:
    """Calibrate (or load `stats`), solve for the budget, write plan + report (+ statistics). See `dit-sparse search`.

    Budgets: `max_error` is the relative L2 error of attention outputs (default 0.1 when no target is given);
    `target_speedup` is the predicted attention speedup over a whole generation; `target_density` the mean
    fraction of attention work of the covered heads during sparse steps. Raises SearchError on bad input and
    when the budget cannot be met (unless `allow_closest`). `threads`: torch CPU threads for the whole search
    (None: the cores not already busy, see `auto_threads`). `layer_weights`: "sensitivity" (each layer's error
    weighted by its measured effect on the transformer output) or "none". `step_weights`: "none" (the sampled
    steps' errors averaged alike) or "sensitivity" (each weighted by the measured effect of a perturbation at that
    step on the generated result; needs statistics from this version). `min_psnr`: generate the calibration
    prompts dense and with candidate plans and keep the fastest plan whose mean PSNR against dense reaches it,
    tightening the error budget and lengthening the dense warm-up as needed (see `validation`). `pick_by_psnr`
    (with a speed or density target): solve the target under several error models, generate the calibration
    prompts with each plan and keep the highest mean PSNR against dense.
    """
    echo = echo or logger.info
    procs = processes(device)  # several under accelerate launch / torchrun; otherwise just this one
    device = procs.device(device)
    if not procs.is_main:
        echo, progress = (lambda message: None), False
    budget = Budget(max_error, target_speedup, target_density)
    try:
        budget.validate()
    except ValueError as e:
        raise SearchError(str(e)) from None
    if not 0.0 <= dense_first < 1.0:
        raise SearchError(f"--dense-first must be a fraction of steps in [0, 1), got {dense_first}")
    if min_psnr is not None:
        if not min_psnr > 0:
            raise SearchError(f"--min-psnr must be a PSNR in dB > 0, got {min_psnr}")
        if target_speedup is not None or target_density is not None:
            raise SearchError("--min-psnr tightens the error budget; use it with --max-error (or no budget), not "
                              "with --target-speedup / --target-density (there, --pick-by-psnr keeps the most "
                              "faithful plan end to end)")
    if pick_by_psnr and target_speedup is None and target_density is None:
        raise SearchError("--pick-by-psnr chooses among plans that meet a speed or density target; give "
                          "--target-speedup or --target-density (with an error budget, use --min-psnr)")
    if step_weights not in STEP_WEIGHTS:
        raise SearchError(f"--step-weights must be one of {', '.join(STEP_WEIGHTS)}, got {step_weights!r}")
    if cost not in ("measured", "flop"):
        raise SearchError(f"--cost must be 'measured' or 'flop', got {cost!r}")
    prompts = _checked_run_options(prompts, device, dtype, threads)
    if refresh_interval is not None and refresh_interval < 1:
        raise SearchError(f"--refresh-interval must be >= 1 step, got {refresh_interval}")
    with _cpu_threads(device, threads):
        return _search(model, prompts, height, width, frames, steps, guidance, budget, dense_first, dense_layers,
                       stats, out, device, dtype, allow_closest, cost, cache_dir, calib_steps, seed, progress, echo,
                       pipe, layer_weights, procs, min_psnr, pick_by_psnr, step_weights, refresh_interval)


def _checked_run_options(prompts, device: str, dtype: str, threads: int | None) -> list[str] | None:
    """The checks both searches make before any work; returns the prompts (read from a file when given one)."""
    from dit_sparse.models import DTYPES

    if dtype not in DTYPES:
        raise SearchError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SearchError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if isinstance(prompts, (str, Path)):
        prompts = read_prompts(prompts)
    elif prompts is not None and not [p for p in prompts if p.strip()]:
        raise SearchError("no prompt given (the prompt list is empty)")
    if threads is not None and threads < 1:
        raise SearchError(f"--threads must be >= 1, got {threads}")
    return prompts


@contextlib.contextmanager
def _cpu_threads(device: str, threads: int | None):
    """Torch CPU threads for a whole search (None: the cores not already busy); restored afterwards."""
    previous_threads = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(threads or auto_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def search_reuse_schedule(model: str | None = None, prompts: list[str] | str | Path | None = None, *,
                          min_psnr: float | None = None, height: int | None = None, width: int | None = None,
                          frames: int | None = None, steps: int | None = None, guidance: float | None = None,
                          out: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                          allow_closest: bool = False, seed: int = 0, progress: bool = True,
                          threads: int | None = None, echo: Callable[[str], None] | None = None,
                          pipe=None, grid=None) -> SearchResult:
    """`dit-sparse search --reuse-schedule`: the fastest schedule of a uniform `reuse` plan whose calibration
    prompts reach `min_psnr` end to end (see `search.schedule`; `grid`, a `ScheduleGrid`, narrows or widens the
    candidates). Writes the plan and a report beside it."""
    from dit_sparse.checks import ArgumentError
    from dit_sparse.models import DTYPES, TINY_SHAPES, load_model
    from dit_sparse.provenance import invoked_command

    from .schedule import search_reuse_schedule as run_schedule_search
    from .schedule import write_schedule_report

    echo = echo or logger.info
    if min_psnr is None or not min_psnr > 0:
        raise SearchError("--reuse-schedule keeps the fastest schedule that reaches --min-psnr; give --min-psnr DB "
                          f"(a PSNR in dB > 0){'' if min_psnr is None else f', got {min_psnr}'}")
    prompts = _checked_run_options(prompts, device, dtype, threads)
    model = model or TINY_SHAPES
    paths = output_paths(out, model)
    paths.pop("stats"), paths.pop("png")
    check_out_folder(paths["plan"])
    if pipe is None and model != TINY_SHAPES:
        model_fingerprint(model)  # an unsupported transformer fails here, before any weight is loaded
    with _cpu_threads(device, threads):
        try:
            pipe = pipe if pipe is not None else load_model(model, device, DTYPES[dtype])
        except (ArgumentError, FileNotFoundError) as e:
            raise SearchError(str(e)) from None
        transformer = transformers_of(pipe)[0]
        adapter_for_transformer(transformer)  # unsupported models fail here, before any generation
        num_steps = steps or _pipeline_defaults(pipe).get("num_inference_steps")
        if not isinstance(num_steps, int):
            raise SearchError(f"{type(pipe).__name__} has no default step count; give --steps")
        prompts = list(prompts) if prompts else default_prompts(pipe)
        kwargs = call_settings(pipe, steps=num_steps, guidance=guidance, height=height, width=width, frames=frames,
                               output_type="np")
        solution, validation, closest = run_schedule_search(
            pipe, transformer, prompts, kwargs, num_steps, min_psnr, seed=seed, allow_closest=allow_closest,
            progress=progress, echo=echo, grid=grid)
    solution.plan.calibration["model"] = model
    command = invoked_command()
    if command is not None:
        solution.plan.calibration["command"] = command
    solution = replace(solution, plan=in_noise_units(solution.plan, noise_levels(pipe, num_steps)))
    solution.plan.save(paths["plan"])
    write_schedule_report(solution, validation, paths["report"], command)
    return SearchResult(solution.plan, solution, None, paths, closest)


def _search(model, prompts, height, width, frames, steps, guidance, budget, dense_first, dense_layers, stats, out,
            device, dtype, allow_closest, cost, cache_dir, calib_steps, seed, progress, echo, pipe,
            layer_weights, procs: Processes, min_psnr: float | None = None,
            pick_by_psnr: bool = False, step_weights: str = "none",
            refresh_interval: int | None = None) -> SearchResult:
    """The search proper; with several processes each calibrates its share, and only the first writes files."""
    from dit_sparse.checks import ArgumentError
    from dit_sparse.models import DTYPES, TINY_SHAPES, load_model

    if stats is not None:
        st = CalibrationStats.load(stats)
        source = model or st.info.get("model") or "the model"
        if model is not None:
            try:
                fingerprint, _ = model_fingerprint(model)
            except ArgumentError as e:
                raise SearchError(str(e)) from None
            st.check_model(fingerprint, repr(model))
        known_names = {"steps": "num_steps", "refresh-interval": "refresh_interval"}
        for name, value in (("height", height), ("width", width), ("frames", frames), ("steps", steps),
                            ("refresh-interval", refresh_interval)):
            known = st.info.get(known_names.get(name, name))
            if value is not None and known is not None and value != known:
                raise SearchError(f"--{name} {value} differs from the statistics ({known}); calibrate again at "
                                  f"this setting or leave --{name} out")
        model = source
        paths = output_paths(out, model)
        paths.pop("stats")
        check_out_folder(paths["plan"])
        cost_model = procs.broadcast(_cost_for_stats(st, cost, device, dtype, cache_dir, progress)
                                     if procs.is_main else None)
    else:
        model = model or TINY_SHAPES
        paths = output_paths(out, model)
        check_out_folder(paths["plan"])  # a read-only or full folder is found now, not after the calibration
        if pipe is None and model != TINY_SHAPES:
            model_fingerprint(model)  # an unsupported transformer fails here, before any weight is loaded
        try:
            pipe = pipe if pipe is not None else load_model(model, device, DTYPES[dtype])
        except (ArgumentError, FileNotFoundError) as e:
            raise SearchError(str(e)) from None
        st, cost_model = _calibrate_pipeline(pipe, model, prompts, height=height, width=width, frames=frames,
                                             steps=steps, guidance=guidance, dense_first=dense_first,
                                             device=device, dtype=dtype, cost=cost, cache_dir=cache_dir,
                                             calib_steps=calib_steps, seed=seed, progress=progress, echo=echo,
                                             procs=procs, refresh_interval=refresh_interval or 5)
        if procs.is_main:
            st.save(paths["stats"])
        echo(f"statistics saved to {paths['stats']} (re-solve in seconds with --stats {paths['stats']})")

    wall = st.info.get("seconds_per_generation")
    closest = False
    try:
        solution = solve(st, cost_model, budget, dense_first=dense_first, dense_layers=tuple(dense_layers),
                         wall_seconds=wall, layer_weights=layer_weights, step_weights=step_weights)
    except InfeasibleBudget as e:
        if not allow_closest:
            hint = f"; statistics are in {paths['stats']}" if "stats" in paths else ""
            raise SearchError(f"{e}. No plan written (pass --allow-closest to write the closest plan){hint}") \
                from None
        echo(f"warning: {e}; writing the closest plan (--allow-closest)")
        solution, closest = e.closest, True
    except ValueError as e:
        raise SearchError(str(e)) from None

    if not procs.is_main:
        procs.barrier()
        return SearchResult(solution.plan, solution, st, {}, closest)
    validation = None
    if (min_psnr is not None or pick_by_psnr) and pipe is None:
        flag = "--min-psnr" if min_psnr is not None else "--pick-by-psnr"
        try:
            pipe = load_model(model, device, DTYPES[dtype])
        except (ArgumentError, FileNotFoundError) as e:
            raise SearchError(f"{flag} generates with the model: {e}") from None
    if min_psnr is not None:
        max_error = budget.max_error if budget.max_error is not None else DEFAULT_MAX_ERROR
        solution, validation, closest = _validated_solution(
            pipe, st, cost_model, max_error, dense_first, dense_layers, wall, layer_weights, min_psnr, seed,
            allow_closest, progress, echo, step_weights)
    elif pick_by_psnr and not closest:
        solution, validation = picked_solution(pipe, st, cost_model, budget, dense_first, dense_layers, wall,
                                               layer_weights, seed=seed, progress=progress, echo=echo,
                                               step_weights=step_weights)
    levels = st.info.get("noise_levels") or (noise_levels(pipe, st.info["num_steps"])
                                             if pipe is not None else None)
    if levels is not None:
        solution = replace(solution, plan=in_noise_units(solution.plan, levels))
    else:  # statistics from before noise levels were recorded, re-solved without loading the model
        logger.warning("the statistics do not record the step grid's noise levels: the plan's dense steps stay "
                       "counted in steps, which only apply(pipe, plan) can follow; calibrate again to write them in "
                       "noise levels")
    solution.plan.save(paths["plan"])
    from .report import write_report

    written = write_report(solution, st, cost_model, paths["report"], paths["png"], plan_path=paths["plan"],
                           budget=budget, closest=closest, validation=validation)
    if "png" not in written:
        paths.pop("png")
    procs.barrier()
    return SearchResult(solution.plan, solution, st, paths, closest)


def _validated_solution(pipe, st: CalibrationStats, cost_model: CostModel, max_error: float, dense_first: float,
                        dense_layers, wall, layer_weights: str, min_psnr: float, seed: int, allow_closest: bool,
                        progress: bool, echo, step_weights: str = "none") -> tuple[Solution, Validation, bool]:
    """The fastest plan on the ladder of budgets whose calibration prompts reach `min_psnr` end to end."""
    def solve_at(first: float, error: float, **kwargs) -> Solution:
        return solve(st, cost_model, Budget(max_error=error), dense_first=first, dense_layers=tuple(dense_layers),
                     wall_seconds=wall, layer_weights=layer_weights, step_weights=step_weights, **kwargs)

    variants = [("", {})] + refreshing_variants(st.candidates)
    trials = candidate_trials(solve_at, settings_ladder(max_error, dense_first), variants)
    prompts, kwargs = _check_settings(pipe, st, "--min-psnr")
    per_clip = st.info.get("seconds_per_generation")
    echo(f"end-to-end check: {len(prompts)} prompts dense, then up to {len(trials)} candidate plans"
         + (f" ({_fmt_seconds(per_clip * len(prompts) * 2)} for the first plan)" if per_clip else ""))
    validation = validate(pipe, prompts, kwargs, trials, min_psnr, seed=seed, progress=progress, echo=echo)
    if validation.chosen is None:
        if not allow_closest:
            raise SearchError(failure_message(validation) + ". No plan written (pass --allow-closest to write the "
                              "plan with the highest PSNR)")
        best = highest_psnr(validation.trials)
        echo(f"warning: {failure_message(validation)}; writing the plan with the highest PSNR (--allow-closest)")
        solution, closest = best.solution, True
        solution.binding = f"closest to --min-psnr {min_psnr:g}: mean PSNR {best.mean_psnr:.1f} dB"
    else:
        solution, closest = validation.chosen.solution, False
        solution.binding += "; " + validated_note(validation)
    solution.plan.calibration["binding"] = solution.binding
    solution.plan.calibration["end_to_end_check"] = validation.to_json()
    return solution, validation, closest


def picked_solution(pipe, st: CalibrationStats, cost_model: CostModel, budget: Budget, dense_first: float,
                    dense_layers=(), wall: float | None = None, layer_weights: str = "sensitivity", *, seed: int = 0,
                    progress: bool = True, echo=lambda message: None,
                    dense_cache: dict | None = None, step_weights: str = "none") -> tuple[Solution, Validation]:
    """Of the plans that meet `budget`'s target under each solver variant, the one whose calibration prompts
    reach the highest mean PSNR against dense (the default variant first, so it wins ties). `dense_cache`: see
    `validation.validate` (compare_uniform picks at many densities with one set of dense clips)."""
    def solve_variant(**kwargs) -> Solution:
        kwargs.setdefault("layer_weights", layer_weights)
        kwargs.setdefault("step_weights", step_weights)
        return solve(st, cost_model, budget, dense_first=dense_first, dense_layers=tuple(dense_layers),
                     wall_seconds=wall, **kwargs)

    families = sorted({c.family for c in st.candidates if (c.computes or c.reuses) and c.family != "dense"})
    variants = asked_model_first(solver_variants(families, st.has_step_weights(),
                                                 any(c.rescale for c in st.candidates)), layer_weights, step_weights)
    trials = variant_trials(solve_variant, variants, dense_first)
    prompts, kwargs = _check_settings(pipe, st, "--pick-by-psnr")
    echo(f"end-to-end check: {len(prompts)} prompts dense, then {len(trials)} plans that meet the target")
    validation = validate(pipe, prompts, kwargs, trials, None, seed=seed, progress=progress, echo=echo,
                          dense_cache=dense_cache)
    solution = validation.chosen.solution
    solution.binding += "; " + validated_note(validation)
    solution.plan.calibration["binding"] = solution.binding
    solution.plan.calibration["end_to_end_check"] = validation.to_json()
    return solution, validation


def _check_settings(pipe, st: CalibrationStats, flag: str) -> tuple[list[str], dict[str, Any]]:
    """The calibration prompts and the calibration run's settings, decoded to frames: a plan is judged on what
    the user sees."""
    prompts = list(st.info.get("prompts") or [])
    if not prompts:
        raise SearchError(f"{flag}: the statistics name no calibration prompts to generate")
    info = st.info
    kwargs = call_settings(pipe, steps=info.get("num_steps"), guidance=info.get("guidance"), height=info.get("height"),
                           width=info.get("width"), frames=info.get("frames"), output_type="np")
    return prompts, kwargs


def _cost_for_stats(st: CalibrationStats, cost: str, device, dtype, cache_dir, progress) -> CostModel:
    from dit_sparse.models import DTYPES

    if st.cost is not None and st.cost.get("kind") == cost:
        return CostModel.from_json(st.cost)
    fp = st.fingerprint
    if cost == "flop":
        return flop_cost(st.candidates, st.grid, st.block_q, st.block_k, fp.num_heads, fp.head_dim)
    return measure_cost(st.candidates, st.grid, st.block_q, st.block_k, int(st.info.get("batch") or 1), fp.num_heads,
                        fp.head_dim, device, DTYPES[dtype], st.info.get("executor"), cache_dir, progress=progress)


def _calibrate_pipeline(pipe, model: str, prompts, *, height, width, frames, steps, guidance, dense_first, device,
                        dtype, cost, cache_dir, calib_steps, seed, progress, echo, procs: Processes,
                        refresh_interval: int = 5):
    from dit_sparse.models import DTYPES

    transformer = transformers_of(pipe)[0]
    adapter = adapter_for_transformer(transformer)  # unsupported models fail here, before any work
    fingerprint = adapter.fingerprint(transformer)
    prompts = list(prompts) if prompts else default_prompts(pipe)
    defaults = _pipeline_defaults(pipe)
    steps = steps or defaults.get("num_inference_steps")
    if not isinstance(steps, int) or steps <= 0:
        raise SearchError(f"--steps: give a positive number of denoising steps (got {steps!r})")
    if guidance is None:
        guidance = defaults.get("guidance_scale")
    for name, value in (("height", height), ("width", width), ("frames", frames)):
        if value is not None and value <= 0:
            raise SearchError(f"--{name} must be positive, got {value}")
    if progress and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    run = pipeline_runner(pipe, prompts, steps=steps, guidance=guidance, height=height, width=width, frames=frames,
                          seed=seed)
    one_step = pipeline_runner(pipe, prompts[:1], steps=1, guidance=guidance, height=height, width=width,
                               frames=frames, seed=seed)
    prb = probe(pipe, lambda: one_step(0, lambda: None))
    dev = torch.device(device)
    ex = get_executor(None, dev)
    block_q, block_k = ex.block_sizes(dev, fingerprint.head_dim)
    torch_dtype = DTYPES[dtype]
    # The first process times the candidates; all calibrate the same list (fp8 kept only where it is faster).
    candidates, cost_model = procs.broadcast(
        _candidates_and_cost(prb, block_q, block_k, fingerprint, dev, torch_dtype, ex.name, cost, cache_dir,
                             progress) if procs.is_main else None)
    layers = len(adapter.covered_modules(transformer))
    sampled = sample_steps(steps, dense_first, calib_steps)
    extrapolate = any(c.reuses and c.spec.param_dict["extrapolate"] for c in candidates)
    remembered = len(history_steps(sampled, int(round(dense_first * steps)), refresh_interval, extrapolate)
                     - set(sampled)) if any(c.refreshes for c in candidates) else 0
    seconds, memory = _estimate(prb, len(prompts), steps, len(sampled), prb.calls_per_step, layers,
                                cost_model.dense_layer if cost_model.kind == "measured" else None, len(candidates),
                                4096, 8, block_q, fingerprint.num_heads, fingerprint.head_dim,
                                sum(c.dynamic for c in candidates), remembered,
                                sum(c.refreshes for c in candidates) * (refresh_interval - 1))
    echo(f"calibration on {dev}{f' ({torch.get_num_threads()} threads)' if dev.type == 'cpu' else ''}: "
         f"{len(prompts)} prompts x {steps} steps on grid {prb.grid.frames}x{prb.grid.height}x"
         f"{prb.grid.width} ({prb.grid.num_tokens} tokens), {layers} layers x {fingerprint.num_heads} heads x "
         f"{len(candidates)} candidates; estimated {_fmt_seconds(seconds)} and {memory / 2**20:.0f} MiB beyond "
         f"the model")
    info = {"model": model, "prompts": prompts, "guidance": guidance, "height": height, "width": width,
            "frames": frames, "device": str(dev), "dtype": dtype}
    start = time.perf_counter()
    st = calibrate(pipe, run, len(prompts), num_steps=steps, grid=prb.grid, candidates=candidates,
                   dense_first=dense_first, calib_steps=calib_steps, refresh_interval=refresh_interval, device=dev,
                   progress=progress, seed=seed, info=info, procs=procs)
    st.info["calibration_seconds"] = time.perf_counter() - start
    st.info["noise_levels"] = noise_levels(pipe, steps)  # the step grid the plan is written for
    if cost_model.kind == "measured" and st.info.get("batch") != prb.batch:
        cost_model = procs.broadcast(
            measure_cost(candidates, prb.grid, block_q, block_k, st.info["batch"], fingerprint.num_heads,
                         fingerprint.head_dim, dev, torch_dtype, ex.name, cache_dir, progress=progress)
            if procs.is_main else None)
    st.cost = cost_model.to_json()
    return st, cost_model


def _candidates_and_cost(prb: Probe, block_q: int, block_k: int, fingerprint: ModelFingerprint, dev: torch.device,
                         torch_dtype: torch.dtype, executor: str, cost: str, cache_dir, progress: bool
                         ) -> tuple[list[Candidate], CostModel]:
    candidates = default_candidates(prb.grid, block_q, block_k)
    if dev.type == "cuda":
        candidates += [with_fp8(c) for c in candidates
                       if c.computes and not c.per_head and not c.dynamic and not c.rescale]
    if cost == "measured":
        cost_model = measure_cost(candidates, prb.grid, block_q, block_k, prb.batch, fingerprint.num_heads,
                                  fingerprint.head_dim, dev, torch_dtype, executor, cache_dir, progress=progress)
        return _keep_faster_fp8(candidates, cost_model), cost_model
    candidates = [c for c in candidates if not c.fp8]
    return candidates, flop_cost(candidates, prb.grid, block_q, block_k, fingerprint.num_heads, fingerprint.head_dim)


def _keep_faster_fp8(candidates: list[Candidate], cost_model: CostModel) -> list[Candidate]:
    """fp8 variants stay only where the cost model says they are faster than the same layout without fp8."""
    base = {c.spec.describe().replace(", fp8", "").replace("(fp8)", ""): c for c in candidates
            if not c.per_head and not c.fp8}
    keep = []
    for c in candidates:
        if c.fp8:
            plain = base.get(c.key.replace(", fp8", "").replace("(fp8)", ""))
            if plain is None or cost_model.head_time(c, 0.5) >= cost_model.head_time(plain, 0.5):
                continue
        keep.append(c)
    return keep


def auto_threads() -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load average).

    Small tensor ops with more threads than free cores spend their time waiting for descheduled threads: on a
    2-core machine shared with a training job, tiny-shapes calibration ran several times faster on one thread.
    """
    import os

    try:
        busy = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    free = int((os.cpu_count() or 1) - busy + 0.5)
    return max(1, min(torch.get_num_threads(), free))


def _fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.1f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"


__all__ = [
    "SearchError",
    "SearchResult",
    "calibrate",
    "model_fingerprint",
    "output_paths",
    "pipeline_runner",
    "probe",
    "read_prompts",
    "search",
]
