"""The calibration run: generations with a dense plan and the calibration observer, timed, with the layer and step
sensitivities measured on the way (`calibrate`), and a one-step probe of what a pipeline calls (`probe`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.api import apply, remove, transformers_of
from dit_sparse.executors import get_executor
from dit_sparse.layout import Grid
from dit_sparse.plan import SparsePlan

from .calibration import CalibrationObserver
from .candidates import Candidate, default_candidates
from .distributed import Processes
from .errors import SearchError
from .history import sample_steps
from .progress import PROGRESS, bar
from .sensitivity import LayerSensitivity, StepSensitivity, measure_step_sensitivity, pipeline_output
from .stats import CalibrationStats

# run(i, on_step): the i-th calibration generation, calling on_step at the end of every denoising step.
Run = Callable[[int, Callable[[], None]], Any]


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """How `calibrate` runs. num_steps: denoising steps of a generation; grid: its video grid (see `probe`);
    candidates: what to evaluate (None: `default_candidates` at the executor's block sizes); dense_first: the
    fraction of first steps the plan will run dense (calibration samples `calib_steps` of the others);
    refresh_interval: steps between refreshes of dynamic layouts and re-scale statistics; executor, block_size:
    as `dit_sparse.apply` takes them; max_rows: sequences up to this many video tokens are scored on every row,
    longer ones on `query_blocks` random query blocks per call; sensitivity_samples: during the first this-many
    generations, measure each layer's sensitivity (one extra transformer call per covered layer at every sampled
    step; 0 turns it off); step_sensitivity: generate the first prompt again once per sampled step with that step
    perturbed (see sensitivity.py; needs a `run` that returns the pipeline output and counts steps, like
    `pipeline_runner`'s); progress: a tqdm bar on stderr."""

    num_steps: int
    grid: Grid
    candidates: list[Candidate] | None = None
    dense_first: float = 0.2
    calib_steps: int = 5
    refresh_interval: int = 5
    executor: str | None = None
    block_size: tuple[int, int] | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    max_rows: int = 4096
    query_blocks: int = 8
    seed: int = 0
    sensitivity_samples: int = 1
    step_sensitivity: bool = True


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


def calibrate(target, run: Run, num_samples: int, options: CalibrationOptions, *, info: dict[str, Any] | None = None,
              procs: Processes | None = None) -> CalibrationStats:
    """Run `num_samples` generations (run(i, on_step)) with a dense plan and the calibration observer.

    target: what dit_sparse.apply takes (a pipeline or a transformer). Returns the statistics (no cost table),
    their `info` updated with this run's. procs: with several processes, each runs its share of the generations
    and every process returns the statistics of all of them.
    """
    opts = options
    procs = procs or Processes()
    indices = procs.shard(num_samples)
    transformer = transformers_of(target)[0]
    adapter = adapter_for_transformer(transformer)
    fingerprint = adapter.fingerprint(transformer)
    covered = adapter.covered_modules(transformer)
    ex = get_executor(opts.executor, torch.device(opts.device))
    block_q, block_k = opts.block_size or ex.block_sizes(torch.device(opts.device), fingerprint.head_dim)
    candidates = opts.candidates if opts.candidates is not None else default_candidates(opts.grid, block_q, block_k)
    steps = sample_steps(opts.num_steps, opts.dense_first, opts.calib_steps)
    first_sparse = int(round(opts.dense_first * opts.num_steps))
    observer = CalibrationObserver([n for n, _ in covered], fingerprint.num_heads, candidates, block_q, block_k,
                                   steps, first_sparse, opts.refresh_interval, max_rows=opts.max_rows,
                                   query_blocks=opts.query_blocks, seed=opts.seed,
                                   reduce=procs.sum if procs.distributed else None,
                                   share_first=procs.from_first if procs.distributed else None)
    processor = apply(target, SparsePlan.uniform(transformer, "dense"), executor=opts.executor,
                      block_size=opts.block_size)
    processor.observers.append(observer)
    step_bar = bar(opts.progress and procs.is_main, len(indices) * opts.num_steps,
                   "calibrating" + (f" (1 of {procs.world} processes)" if procs.distributed else ""), "step")
    wall, attention = [], []
    timer = _ModuleTimer(observer)
    handles = timer.attach([dict(t.named_modules())[name] for t in transformers_of(target) for name, _ in covered
                            if name in dict(t.named_modules())])
    sensitivity = None
    if opts.sensitivity_samples > 0:
        modules = dict(transformer.named_modules())
        sensitivity = LayerSensitivity(transformer, [modules[name] for name, _ in covered], observer, set(steps),
                                       timer, seed=opts.seed)
        handles.append(sensitivity.attach())
    measure_steps = opts.step_sensitivity and getattr(run, "counts_steps", False)  # the same on every process
    reference, step_values = None, None
    try:
        for n, i in enumerate(indices):
            if sensitivity is not None:
                sensitivity.active = n < opts.sensitivity_samples
            before, attn_before = observer.seconds, timer.seconds
            start = time.perf_counter()
            with torch.no_grad():
                output = run(i, step_bar.update if step_bar is not None else (lambda: None))
            wall.append(time.perf_counter() - start - (observer.seconds - before))
            attention.append(timer.seconds - attn_before)
            if n == 0 and measure_steps and output is not None:  # this process's first prompt
                reference = pipeline_output(output)
        if reference is not None:
            step_values = _step_sensitivity(transformer, run, indices[0], steps, reference, observer, timer,
                                            sensitivity, opts.seed, opts.progress and procs.is_main)
    finally:
        for handle in handles:
            handle.remove()
        if step_bar is not None:
            step_bar.close()
        remove(target)
    error, density, columns = observer.results()  # summed over processes: every process reaches this
    missing = [name for name, mi in observer.modules.items() if np.isnan(error[mi]).all()]
    if missing:
        raise SearchError(f"calibration never evaluated {', '.join(missing[:3])}: no call reached the sampled steps "
                          f"{steps} (does the pipeline run {opts.num_steps} steps?)")
    calls = observer.calls_per_module.get(covered[0][0], 0)
    info = dict(info or {})
    info.update({
        "num_steps": opts.num_steps,
        "sample_steps": steps,
        "dense_first": opts.dense_first,
        "refresh_interval": opts.refresh_interval,
        "calls_per_step": calls / max(1, len(indices) * opts.num_steps),
        "batch": observer.batch,
        "branches": sorted(observer.branches),
        "executor": ex.name,
        # The first generation warms up; later ones are representative.
        "seconds_per_generation": sum(wall[1:] or wall) / len(wall[1:] or wall),
        "attention_seconds_per_generation": sum(attention[1:] or attention) / len(attention[1:] or attention),
        "observer_seconds": observer.seconds,
        "rows": "all" if opts.grid.num_tokens <= opts.max_rows else f"{opts.query_blocks} query blocks per call",
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
        PROGRESS.info("step sensitivity: generating calibration prompt 1 again at %d perturbed steps", len(steps))
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
