"""End-to-end checks of searched plans: generate the calibration prompts dense and with candidate plans (same
seeds) and judge each plan by its PSNR against dense.

Per-head attention errors predict a plan's fidelity only loosely: errors compound along the denoising trajectory
and classifier-free guidance scales the difference between its two branches (on tiny-shapes the same 0.1 error
budget gave 21-23 dB with a 20% dense warm-up and 25 dB with 40%). Two uses:

- ``--min-psnr`` (error budgets): candidates are the asked budget, tighter error budgets and longer dense
  warm-ups, tried in order of predicted speed; the first plan that reaches the bar is the fastest predicted plan
  that does.
- ``--pick-by-psnr`` (speed or density targets): every plan meets the target, so speed is settled and fidelity
  decides. Candidates are the solver's plan under several error models (layer-sensitivity weights or none, all
  strategy families or one family with per-head parameters); all are generated and the highest mean PSNR wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dit_sparse.api import apply, remove
from dit_sparse.metrics import psnr

from .errors import SearchError
from .progress import PROGRESS, bar
from .solver import InfeasibleBudget, Solution

# Error budgets tried below the asked one, and dense warm-up added in steps of WARMUP_STEP up to MAX_DENSE_FIRST.
ERROR_LADDER = (0.2, 0.15, 0.1, 0.075, 0.05, 0.035, 0.025)
WARMUP_STEP = 0.1
MAX_DENSE_FIRST = 0.5
# Identical outputs have infinite PSNR; a mean over prompts counts them as this many dB.
PSNR_CAP = 100.0


@dataclass
class Trial:
    """One candidate plan and the PSNR of each validation prompt against dense (empty until generated).
    max_error is None for plans solved for a speed or density target; variant names the solver setting."""

    dense_first: float
    max_error: float | None
    solution: Solution
    variant: str = ""
    psnr: list[float] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"dense first {self.dense_first:.0%}"]
        if self.max_error is not None:
            parts.append(f"max error {self.max_error:g}")
        if self.variant:
            parts.append(self.variant)
        return ", ".join(parts)

    @property
    def predicted_speedup(self) -> float:
        m = self.solution.metrics
        return float(m.get("end_to_end_speedup") or m["attention_speedup"])

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([min(p, PSNR_CAP) for p in self.psnr])) if self.psnr else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"dense_first": self.dense_first, "max_error": self.max_error, "variant": self.variant or None,
                "predicted_speedup": self.predicted_speedup, "mean_psnr": self.mean_psnr if self.psnr else None,
                "min_psnr": min(self.psnr) if self.psnr else None}


@dataclass
class Validation:
    """min_psnr None: every trial was generated and `chosen` has the highest mean PSNR (--pick-by-psnr);
    otherwise trials are in the order tried and the last one passed when `chosen` is set (--min-psnr)."""

    min_psnr: float | None
    prompts: list[str]
    trials: list[Trial]
    chosen: Trial | None

    def to_json(self) -> dict[str, Any]:
        return {"mode": "highest PSNR" if self.min_psnr is None else "first over the bar",
                "min_psnr": self.min_psnr, "prompts": len(self.prompts),
                "chosen": self.chosen.to_json() if self.chosen else None,
                "tried": [t.to_json() for t in self.trials]}


def settings_ladder(max_error: float, dense_first: float) -> list[tuple[float, float]]:
    """(dense_first, max_error) pairs: the asked ones first, then tighter errors and longer warm-ups."""
    errors = [max_error] + [e for e in ERROR_LADDER if e < max_error - 1e-12]
    firsts = [dense_first]
    while firsts[-1] + WARMUP_STEP <= MAX_DENSE_FIRST + 1e-9:
        firsts.append(round(firsts[-1] + WARMUP_STEP, 6))
    return [(d, e) for d in firsts for e in errors]


def candidate_trials(solve_at: Callable[..., Solution], ladder: list[tuple[float, float]],
                     variants: list[tuple[str, dict[str, Any]]] | None = None) -> list[Trial]:
    """Solve every ladder point (under each solver variant: (name, extra solve_at arguments); default the plain
    solver); drop infeasible and duplicate plans; fastest predicted first (ties: the asked budget's order, i.e.
    looser warm-up and budget first, then the variants' order)."""
    trials, seen = [], set()
    for dense_first, max_error in ladder:
        for name, kwargs in variants or [("", {})]:
            try:
                solution = solve_at(dense_first, max_error, **kwargs)
            except InfeasibleBudget:
                continue
            # warm-ups that round to the same number of dense steps run the same plan
            key = (solution.metrics["dense_steps"], solution.assign.tobytes())
            if key in seen:
                continue
            seen.add(key)
            trials.append(Trial(dense_first, max_error, solution, variant=name))
    return sorted(trials, key=lambda t: -t.predicted_speedup)


# Per-head attention errors under-rate the re-scaled softmax end to end (its errors do not pile up the way a
# layout's missing mass does: see benchmarks/results/search-tiny-shapes/rescale-search), so the end-to-end checks
# also try plans made of re-scaled strategies only.
RESCALED_ONLY = ("re-scaled strategies only", {"rescaled_only": True})
# The same holds for `reuse`: its errors are old outputs, smooth in time, and cost far less end to end than a
# layout's error of the same size (benchmarks/results/search-tiny-shapes/reuse/), so plans of reuse and dense
# heads only are tried too.
REUSE_ONLY = ("reuse only", {"families": ("reuse",)})


def solver_variants(families: list[str], step_weights: bool = False,
                    rescaled: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(description, extra solve() arguments): the error models --pick-by-psnr compares (the family-only and
    re-scaled-only variants take the asked layer and step weights)."""
    variants = [("all strategies, layer-sensitivity weights", {"layer_weights": "sensitivity", "step_weights": "none"}),
                ("all strategies, unweighted layers", {"layer_weights": "none", "step_weights": "none"})]
    if step_weights:
        variants.append(("all strategies, layer- and step-sensitivity weights",
                         {"layer_weights": "sensitivity", "step_weights": "sensitivity"}))
    variants += [(f"{family} only", {"families": (family,)}) for family in families]
    return variants + ([RESCALED_ONLY] if rescaled else [])


def refreshing_variants(candidates) -> list[tuple[str, dict[str, Any]]]:
    """The variants the --min-psnr ladder adds to the plain solver: re-scaled only and reuse only, where those
    candidates were calibrated."""
    return [RESCALED_ONLY] * any(c.rescale for c in candidates) + [REUSE_ONLY] * any(c.reuses for c in candidates)


def asked_model_first(variants: list[tuple[str, dict[str, Any]]], layer_weights: str,
                      step_weights: str) -> list[tuple[str, dict[str, Any]]]:
    """The variant of the asked error model first (it wins ties), added when it is not among them."""
    asked = {"layer_weights": layer_weights, "step_weights": step_weights}
    rest = [v for v in variants if v[1] != asked]
    name = next((n for n, kw in variants if kw == asked), f"all strategies, {layer_weights} layer weights, "
                                                         f"{step_weights} step weights (asked)")
    return [(name, asked)] + rest


def variant_trials(solve_variant: Callable[..., Solution], variants: list[tuple[str, dict[str, Any]]],
                   dense_first: float) -> list[Trial]:
    """Solve every variant; drop the ones that cannot meet the target and duplicate plans (first kept)."""
    trials, seen = [], set()
    for name, kwargs in variants:
        try:
            solution = solve_variant(**kwargs)
        except InfeasibleBudget:
            continue
        key = solution.assign.tobytes()
        if key not in seen:
            seen.add(key)
            trials.append(Trial(dense_first, None, solution, variant=name))
    return trials


def validate(pipe, prompts: list[str], call_kwargs: dict[str, Any], trials: list[Trial], min_psnr: float | None, *,
             seed: int = 0, executor: str | None = None, progress: bool = True,
             dense_cache: dict[tuple[str, int], np.ndarray] | None = None) -> Validation:
    """Generate each prompt dense, then with each trial's plan until one reaches `min_psnr` on average; with
    `min_psnr` None, with every trial's plan, and choose the highest mean PSNR. `dense_cache` ((prompt, seed) ->
    frames) keeps the dense clips for later calls with the same pipeline and settings. Each verdict is logged on
    the progress logger."""
    if not trials:
        raise SearchError("end-to-end check: no plan to check (every candidate budget was infeasible)")
    dense_cache = {} if dense_cache is None else dense_cache
    keys = [(p, seed + i) for i, p in enumerate(prompts)]
    missing = sum(key not in dense_cache for key in keys)
    clips = bar(progress, missing + len(prompts) * len(trials), "checking plans end to end", "clip")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, i: int) -> np.ndarray:
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        with torch.no_grad():
            try:
                frames = pipe(prompt=prompt, generator=generator, **call_kwargs).frames[0]
            except ValueError as e:
                raise SearchError(f"the pipeline refused these settings: {e}") from None
        if clips is not None:
            clips.update()
        return frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)

    tried: list[Trial] = []
    try:
        for i, key in enumerate(keys):
            if key not in dense_cache:
                dense_cache[key] = generate(key[0], i)
        dense = [dense_cache[key] for key in keys]
        for trial in trials:
            apply(pipe, trial.solution.plan, executor=executor)
            try:
                trial.psnr = [psnr(ref, generate(p, i)) for i, (p, ref) in enumerate(zip(prompts, dense))]
            finally:
                remove(pipe)
            tried.append(trial)
            verdict = "" if min_psnr is None else \
                f" ({'passes' if trial.mean_psnr >= min_psnr else 'below'} {min_psnr:g} dB)"
            PROGRESS.info(f"end-to-end check: {trial.describe()}, predicted {trial.predicted_speedup:.2f}x: mean "
                          f"PSNR {trial.mean_psnr:.1f} dB{verdict}")
            if min_psnr is not None and trial.mean_psnr >= min_psnr:
                return Validation(min_psnr, list(prompts), tried, trial)
    finally:
        if clips is not None:
            clips.close()
    if min_psnr is None:
        return Validation(None, list(prompts), tried, highest_psnr(tried))
    return Validation(min_psnr, list(prompts), tried, None)


def highest_psnr(trials: list[Trial]) -> Trial:
    """The best mean PSNR; ties go to the earlier trial."""
    return max(trials, key=lambda t: t.mean_psnr if not math.isnan(t.mean_psnr) else -math.inf)


def validated_note(validation: Validation) -> str:
    t = validation.chosen
    if validation.min_psnr is None:
        return (f"end-to-end check: the highest mean PSNR against dense ({t.mean_psnr:.1f} dB on "
                f"{len(validation.prompts)} prompts) of {len(validation.trials)} plans that meet the target "
                f"({t.variant})")
    return (f"end-to-end check: mean PSNR {t.mean_psnr:.1f} dB against dense >= {validation.min_psnr:g} dB on "
            f"{len(validation.prompts)} prompts (plan {len(validation.trials)} of the candidates tried, fastest "
            f"predicted first), at dense first {t.dense_first:.0%} and max error {t.max_error:g}")


def failure_message(validation: Validation) -> str:
    best = highest_psnr(validation.trials)
    return (f"no plan reached mean PSNR {validation.min_psnr:g} dB against dense on {len(validation.prompts)} "
            f"prompts: the best of {len(validation.trials)} tried reached {best.mean_psnr:.1f} dB (dense first "
            f"{best.dense_first:.0%}, max error {best.max_error:g}); lower `min_psnr` or keep more steps dense "
            f"(`dense_first`)")


__all__ = ["RESCALED_ONLY", "REUSE_ONLY", "Trial", "Validation", "asked_model_first", "candidate_trials",
           "failure_message", "highest_psnr", "refreshing_variants", "settings_ladder", "solver_variants", "validate",
           "validated_note", "variant_trials"]
