"""Calibrating a diffusers pipeline for a search: probe one step, choose and time the candidates, say what the run
will cost, then `calibrate` on the prompts."""

from __future__ import annotations

import time

import torch

from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.api import noise_levels, transformers_of
from dit_sparse.executors import get_executor
from dit_sparse.layout import num_blocks
from dit_sparse.models import DTYPES, call_defaults
from dit_sparse.plan import ModelFingerprint

from .calibration_run import CalibrationOptions, Probe, calibrate, probe
from .candidates import Candidate, default_candidates, with_fp8
from .config import SearchConfig
from .cost import CostModel, flop_cost, measure_cost
from .distributed import Processes
from .errors import SearchError
from .history import history_steps, sample_steps
from .pipeline import calibration_prompts, pipeline_runner
from .progress import PROGRESS, fmt_seconds
from .stats import CalibrationStats

# Observer work per evaluated call, in units of one dense attention call over the sampled rows (measured on
# tiny-shapes on CPU); used only for the estimate printed before a run.
EVAL_COST_FACTOR = 5.0


def calibrate_pipeline(pipe, model: str, prompts: list[str] | None, config: SearchConfig,
                       procs: Processes) -> tuple[CalibrationStats, CostModel]:
    """The statistics of `pipe` on `prompts` (None: `calibration_prompts`) with `config`'s settings, and the cost
    model they were solved with (kept in the statistics). `model` names the model in the statistics."""
    transformer = transformers_of(pipe)[0]
    adapter = adapter_for_transformer(transformer)  # unsupported models fail here, before any work
    fingerprint = adapter.fingerprint(transformer)
    prompts = list(prompts) if prompts else calibration_prompts(pipe)
    defaults = call_defaults(pipe)
    steps = config.steps or defaults.get("num_inference_steps")
    if not isinstance(steps, int) or steps <= 0:
        raise SearchError(f"`steps`: give a positive number of denoising steps (got {steps!r})")
    guidance = config.guidance if config.guidance is not None else defaults.get("guidance_scale")
    if config.progress and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    sizes = {"guidance": guidance, "height": config.height, "width": config.width, "frames": config.frames}
    run = pipeline_runner(pipe, prompts, steps=steps, seed=config.seed, **sizes)
    one_step = pipeline_runner(pipe, prompts[:1], steps=1, seed=config.seed, **sizes)
    prb = probe(pipe, lambda: one_step(0, lambda: None))
    dev = torch.device(config.device)
    ex = get_executor(None, dev)
    block_q, block_k = ex.block_sizes(dev, fingerprint.head_dim)
    # The first process times the candidates; all calibrate the same list (fp8 kept only where it is faster).
    candidates, cost_model = procs.broadcast(
        _candidates_and_cost(prb, block_q, block_k, fingerprint, ex.name, config) if procs.is_main else None)
    options = CalibrationOptions(num_steps=steps, grid=prb.grid, candidates=candidates,
                                 dense_first=config.dense_first, calib_steps=config.calib_steps,
                                 refresh_interval=config.refresh_interval or 5, device=dev, progress=config.progress,
                                 seed=config.seed)
    layers = len(adapter.covered_modules(transformer))
    seconds, memory = _estimate(prb, options, len(prompts), layers, fingerprint, block_q, cost_model)
    PROGRESS.info(f"calibration on {dev}{f' ({torch.get_num_threads()} threads)' if dev.type == 'cpu' else ''}: "
                  f"{len(prompts)} prompts x {steps} steps on grid {prb.grid.frames}x{prb.grid.height}x"
                  f"{prb.grid.width} ({prb.grid.num_tokens} tokens), {layers} layers x {fingerprint.num_heads} "
                  f"heads x {len(candidates)} candidates; estimated {fmt_seconds(seconds)} and "
                  f"{memory / 2**20:.0f} MiB beyond the model")
    info = {"model": model, "prompts": prompts, "guidance": guidance, "height": config.height,
            "width": config.width, "frames": config.frames, "device": str(dev), "dtype": config.dtype}
    start = time.perf_counter()
    st = calibrate(pipe, run, len(prompts), options, info=info, procs=procs)
    st.info["calibration_seconds"] = time.perf_counter() - start
    st.info["noise_levels"] = noise_levels(pipe, steps)  # the step grid the plan is written for
    if cost_model.kind == "measured" and st.info.get("batch") != prb.batch:
        cost_model = procs.broadcast(
            measure_cost(candidates, prb.grid, block_q, block_k, st.info["batch"], fingerprint.num_heads,
                         fingerprint.head_dim, dev, DTYPES[config.dtype], ex.name, config.cache_dir,
                         progress=config.progress)
            if procs.is_main else None)
    st.cost = cost_model.to_json()
    return st, cost_model


def _candidates_and_cost(prb: Probe, block_q: int, block_k: int, fingerprint: ModelFingerprint, executor: str,
                         config: SearchConfig) -> tuple[list[Candidate], CostModel]:
    dev = torch.device(config.device)
    candidates = default_candidates(prb.grid, block_q, block_k)
    if dev.type == "cuda":
        candidates += [with_fp8(c) for c in candidates
                       if c.computes and not c.per_head and not c.dynamic and not c.rescale]
    if config.cost == "measured":
        cost_model = measure_cost(candidates, prb.grid, block_q, block_k, prb.batch, fingerprint.num_heads,
                                  fingerprint.head_dim, dev, DTYPES[config.dtype], executor, config.cache_dir,
                                  progress=config.progress)
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


def _estimate(prb: Probe, opts: CalibrationOptions, prompts: int, layers: int, fingerprint: ModelFingerprint,
              block_q: int, cost_model: CostModel) -> tuple[float, float]:
    """(seconds, extra bytes) expected for calibrating `prompts` generations with `opts`."""
    candidates, steps, refresh_interval = opts.candidates, opts.num_steps, opts.refresh_interval
    sampled = sample_steps(steps, opts.dense_first, opts.calib_steps)
    calls_per_step, heads, head_dim = prb.calls_per_step, fingerprint.num_heads, fingerprint.head_dim
    dense_layer = cost_model.dense_layer if cost_model.kind == "measured" else None
    # steps that only keep re-scale statistics or dense outputs, and the statistics kept per step (one per age)
    extrapolate = any(c.reuses and c.spec.param_dict["extrapolate"] for c in candidates)
    remembered = len(history_steps(sampled, int(round(opts.dense_first * steps)), refresh_interval, extrapolate)
                     - set(sampled)) if any(c.refreshes for c in candidates) else 0
    kept = sum(c.refreshes for c in candidates) * (refresh_interval - 1)
    # the generations, plus the first prompt again once per sampled step (step sensitivity)
    seconds = prb.step_seconds * steps * (prompts + len(sampled))
    seq = prb.grid.num_tokens
    rows = seq if seq <= opts.max_rows else min(seq, opts.query_blocks * block_q)
    if dense_layer:
        evaluated = prompts * len(sampled) * calls_per_step * layers
        seconds += evaluated * dense_layer * (rows / seq) * EVAL_COST_FACTOR * max(1.0, len(candidates) / 20)
        seconds += prompts * remembered * calls_per_step * layers * dense_layer * (rows / seq) * EVAL_COST_FACTOR
    nk = num_blocks(seq, 128)
    dynamic = sum(c.dynamic for c in candidates)
    stored = layers * max(1, int(calls_per_step)) * dynamic * prb.batch * heads * nk * nk
    stored += 4 * layers * max(1, int(calls_per_step)) * kept * prb.batch * heads * rows * (head_dim + 1)
    working = 4 * prb.batch * rows * heads * (2 * seq + 8 * nk * (head_dim + 1))
    return seconds, float(min(working, 4 * (1 << 26) * 3) + stored)
