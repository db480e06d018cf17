"""Plans chosen end to end (see `validation`): the fastest plan on a ladder of tighter error budgets and longer warm-ups
that reaches `min_psnr` (`validated_solution`), or the most faithful of the plans that meet a speed or density
target under several error models (`picked_solution`)."""

from __future__ import annotations

from typing import Any

from .config import SearchConfig
from .cost import CostModel
from .errors import SearchError
from .pipeline import call_settings
from .progress import PROGRESS, fmt_seconds
from .solver import DEFAULT_MAX_ERROR, Budget, Solution, solve
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


def validated_solution(pipe, st: CalibrationStats, cost_model: CostModel, config: SearchConfig,
                       wall: float | None) -> tuple[Solution, Validation, bool]:
    """The fastest plan on the ladder of budgets whose calibration prompts reach `config.min_psnr` end to end;
    (solution, validation, closest). `wall`: seconds per generation, for the predicted end-to-end speedup."""
    max_error = config.max_error if config.max_error is not None else DEFAULT_MAX_ERROR

    def solve_at(first: float, error: float, **kwargs) -> Solution:
        return solve(st, cost_model, Budget(max_error=error), dense_first=first, dense_layers=config.dense_layers,
                     wall_seconds=wall, layer_weights=config.layer_weights, step_weights=config.step_weights,
                     **kwargs)

    variants = [("", {})] + refreshing_variants(st.candidates)
    trials = candidate_trials(solve_at, settings_ladder(max_error, config.dense_first), variants)
    prompts, kwargs = _check_settings(pipe, st, "min_psnr")
    per_clip = st.info.get("seconds_per_generation")
    PROGRESS.info(f"end-to-end check: {len(prompts)} prompts dense, then up to {len(trials)} candidate plans"
                  + (f" ({fmt_seconds(per_clip * len(prompts) * 2)} for the first plan)" if per_clip else ""))
    validation = validate(pipe, prompts, kwargs, trials, config.min_psnr, seed=config.seed,
                          progress=config.progress)
    if validation.chosen is None:
        if not config.allow_closest:
            # Worded with the flag: tests that call search() assert this text.
            raise SearchError(failure_message(validation) + ". No plan written (pass --allow-closest to write the "
                              "plan with the highest PSNR)")
        best = highest_psnr(validation.trials)
        PROGRESS.warning(f"{failure_message(validation)}; writing the plan with the highest PSNR (`allow_closest`)")
        solution, closest = best.solution, True
        solution.binding = f"closest to --min-psnr {config.min_psnr:g}: mean PSNR {best.mean_psnr:.1f} dB"
    else:
        solution, closest = validation.chosen.solution, False
        solution.binding += "; " + validated_note(validation)
    _record(solution, validation)
    return solution, validation, closest


def picked_solution(pipe, st: CalibrationStats, cost_model: CostModel, budget: Budget, dense_first: float, *,
                    dense_layers: tuple[int, ...] = (), wall: float | None = None,
                    layer_weights: str = "sensitivity", step_weights: str = "none", seed: int = 0,
                    progress: bool = True, dense_cache: dict | None = None) -> tuple[Solution, Validation]:
    """Of the plans that meet `budget`'s target under each solver variant, the one whose calibration prompts
    reach the highest mean PSNR against dense (the asked error model first, so it wins ties). `dense_cache`: see
    `validation.validate` (compare_uniform picks at many densities with one set of dense clips)."""
    def solve_variant(**kwargs) -> Solution:
        kwargs.setdefault("layer_weights", layer_weights)
        kwargs.setdefault("step_weights", step_weights)
        return solve(st, cost_model, budget, dense_first=dense_first, dense_layers=tuple(dense_layers),
                     wall_seconds=wall, **kwargs)

    families = sorted({c.family for c in st.candidates if (c.computes or c.reuses) and not c.dense})
    variants = asked_model_first(solver_variants(families, st.has_step_weights(),
                                                 any(c.rescale for c in st.candidates)), layer_weights, step_weights)
    trials = variant_trials(solve_variant, variants, dense_first)
    prompts, kwargs = _check_settings(pipe, st, "pick_by_psnr")
    PROGRESS.info(f"end-to-end check: {len(prompts)} prompts dense, then {len(trials)} plans that meet the target")
    validation = validate(pipe, prompts, kwargs, trials, None, seed=seed, progress=progress, dense_cache=dense_cache)
    solution = validation.chosen.solution
    solution.binding += "; " + validated_note(validation)
    _record(solution, validation)
    return solution, validation


def _record(solution: Solution, validation: Validation) -> None:
    """The plan says why it was chosen and what the end-to-end check measured."""
    solution.plan.calibration["binding"] = solution.binding
    solution.plan.calibration["end_to_end_check"] = validation.to_json()


def _check_settings(pipe, st: CalibrationStats, setting: str) -> tuple[list[str], dict[str, Any]]:
    """The calibration prompts and the calibration run's settings, decoded to frames: a plan is judged on what
    the user sees. `setting` names the option that asked for the check."""
    prompts = list(st.info.get("prompts") or [])
    if not prompts:
        raise SearchError(f"`{setting}`: the statistics name no calibration prompts to generate")
    info = st.info
    kwargs = call_settings(pipe, steps=info.get("num_steps"), guidance=info.get("guidance"), height=info.get("height"),
                           width=info.get("width"), frames=info.get("frames"), output_type="np")
    return prompts, kwargs
