"""`dit-sparse search --reuse-schedule`: search the schedule of a uniform `reuse` plan end to end.

Every covered module reuses its output between refreshes; what decides speed and fidelity is the schedule: how many
first and last steps stay dense, how often the output is refreshed, and the order of the forecast between
refreshes. Attention runs only at dense and refresh steps, so the fraction of steps at which it runs (the executed
density) orders the candidates by speed exactly. The search generates the calibration prompts dense and then with
each candidate, fastest first, and keeps the first whose mean PSNR against dense reaches --min-psnr.

Why a schedule search beside the per-head solver: the solver sees attention errors one step at a time, while what
ruins a reused output is where in the trajectory it is reused. Outputs change fast in the first and the last few
steps and slowly between (on tiny-shapes the relative error of a one-step linear forecast of an attn1 output is
1-9% from step 6 to 15 of 20 and up to 44% in the last three: benchmarks/reuse_forecast_profile.py), and only an
end-to-end check sees how those errors add up.
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dit_sparse.atomic import write_text
from dit_sparse.plan import Schedule, SparsePlan

from .errors import SearchError
from .progress import PROGRESS
from .solver import Solution
from .validation import Trial, Validation, highest_psnr, validate

if TYPE_CHECKING:
    from .config import ScheduleSearchConfig

# At equal speed the second-order forecast is tried first: the more faithful on tiny-shapes at 20 steps. Both are
# tried: at 50 steps the linear one was the better at 3 dense first, 3 dense last, refresh 5 (30.9 against 28.8 dB).
ORDERS = (2, 1)
FORECASTS = {0: "held", 1: "linear forecast", 2: "second-order forecast"}


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ScheduleGrid:
    """The values each knob of a candidate schedule takes; None: the default for the step count (`for_steps`)."""

    dense_first_steps: tuple[int, ...] | None = None
    dense_last_steps: tuple[int, ...] | None = None
    refresh_intervals: tuple[int, ...] | None = None
    orders: tuple[int, ...] | None = None

    def __post_init__(self):
        # Worded with the --grid-* flags as well as the fields: tests that build a grid assert this text.
        smallest = {"dense_first_steps": (1, "--grid-first", "the first step is always dense: nothing to reuse yet"),
                    "dense_last_steps": (0, "--grid-last", "a count of steps"),
                    "refresh_intervals": (2, "--grid-refresh", "an interval of 1 refreshes every step: dense")}
        for name, (low, flag, why) in smallest.items():
            values = getattr(self, name)
            if values is not None and (len(values) == 0 or any(not _whole(v) or v < low for v in values)):
                raise SearchError(f"schedule grid: {name.replace('_', ' ')} ({flag}) must be whole numbers >= {low} "
                                  f"({why}), got {list(values)}")
        if self.orders is not None and (len(self.orders) == 0 or any(not _whole(o) or o not in FORECASTS
                                                               for o in self.orders)):
            raise SearchError(f"schedule grid: forecast orders (--grid-order) must be among {sorted(FORECASTS)} (0 "
                              f"holds the output, 1 and 2 forecast it), got {list(self.orders)}")
        for field in fields(self):
            values = getattr(self, field.name)
            if values is not None:  # lists or numpy integers in, a hashable grid of ints out
                object.__setattr__(self, field.name, tuple(int(v) for v in values))

    def for_steps(self, num_steps: int) -> ScheduleGrid:
        """The grid with defaults filled in. Outputs change fast in roughly the first 15% of the steps, so the dense
        warm-up ranges over up to that share; longer runs change less per step and afford longer intervals."""
        return ScheduleGrid(
            self.dense_first_steps or tuple(range(1, max(6, num_steps * 15 // 100) + 1)),
            self.dense_last_steps or (0, 1, 2, 3),
            self.refresh_intervals or tuple(range(2, max(5, num_steps // 8) + 1)),
            self.orders or ORDERS)


@dataclass(frozen=True)
class ReuseSchedule:
    """One candidate: dense first and last steps, refresh interval, forecast order (0: hold the output)."""

    dense_first_steps: int
    dense_last_steps: int
    refresh_interval: int
    order: int

    def runs_attention(self, num_steps: int) -> list[bool]:
        """Per step: whether attention runs (dense, or a refresh: the first sparse step, then every interval)."""
        first_sparse = self.dense_first_steps
        last_sparse = num_steps - self.dense_last_steps
        return [not first_sparse <= s < last_sparse or (s - first_sparse) % self.refresh_interval == 0
                for s in range(num_steps)]

    def executed_density(self, num_steps: int) -> float:
        return sum(self.runs_attention(num_steps)) / num_steps

    def describe(self) -> str:
        forecast = FORECASTS[self.order]
        return (f"{self.dense_first_steps} dense first, {self.dense_last_steps} dense last, refresh every "
                f"{self.refresh_interval}, {forecast}")

    def plan(self, transformer, num_steps: int) -> SparsePlan:
        schedule = Schedule(dense_first=self.dense_first_steps / num_steps, dense_last_steps=self.dense_last_steps,
                            refresh_interval=self.refresh_interval)
        plan = SparsePlan.uniform(transformer, "reuse", schedule=schedule, extrapolate=self.order > 0,
                                  order=max(self.order, 1))
        plan.calibration.update({"source": "dit-sparse search --reuse-schedule", "schedule": self.describe(),
                                 "steps": num_steps})
        return plan


def schedule_grid(num_steps: int, grid: ScheduleGrid | None = None) -> list[ReuseSchedule]:
    """Every candidate of `grid` that leaves at least one step sparse, fastest (lowest executed density) first; at
    equal density, more dense last steps first (the last steps are where reuse costs most), then the grid's order
    of forecast orders."""
    values = (grid or ScheduleGrid()).for_steps(num_steps)
    orders = values.orders
    candidates = []
    for first, last, interval, order in itertools.product(values.dense_first_steps, values.dense_last_steps,
                                                          values.refresh_intervals, orders):
        if first + last >= num_steps:
            continue
        candidates.append(ReuseSchedule(first, last, interval, order))
    unique = {}
    for cand in candidates:  # candidates that run attention at the same steps with the same forecast are one plan
        unique.setdefault((tuple(cand.runs_attention(num_steps)), cand.order), cand)
    return sorted(unique.values(), key=lambda c: (c.executed_density(num_steps), -c.dense_last_steps,
                                                  orders.index(c.order), c.refresh_interval))


class ScheduleTrial(Trial):
    """A trial named by its schedule alone (the dense warm-up is part of it)."""

    def describe(self) -> str:
        return self.variant


def schedule_trials(transformer, num_steps: int, candidates: list[ReuseSchedule]) -> list[Trial]:
    """The candidates as trials of the end-to-end check. Their predicted speed is the attention speedup of the
    covered modules, 1 / executed density: a reused module runs nothing between refreshes."""
    trials = []
    for cand in candidates:
        density = cand.executed_density(num_steps)
        metrics = {"attention_speedup": 1.0 / density, "end_to_end_speedup": None, "executed_density": density,
                   "density": density, "relative_l2_error": float("nan"), "dense_steps": cand.dense_first_steps}
        solution = Solution(np.zeros((0, 0), dtype=np.int64), cand.plan(transformer, num_steps), metrics,
                            binding=cand.describe())
        trials.append(ScheduleTrial(cand.dense_first_steps / num_steps, None, solution, variant=cand.describe()))
    return trials


def fastest_schedule(pipe, transformer, prompts: list[str], call_kwargs: dict[str, Any], num_steps: int,
                     config: ScheduleSearchConfig, max_trials: int | None = None) -> tuple[Solution, Validation, bool]:
    """The fastest uniform-reuse schedule of `config.grid` whose calibration prompts, generated with
    `call_kwargs`, reach `config.min_psnr` (mean PSNR against dense). Returns (solution, validation, closest);
    raises SearchError when none does (unless `config.allow_closest`)."""
    min_psnr = config.min_psnr
    if num_steps < 2:
        raise SearchError(f"`reuse_schedule` needs at least 2 denoising steps, got {num_steps}")
    candidates = schedule_grid(num_steps, config.grid)[:max_trials]
    if not candidates:
        raise SearchError(f"the schedule grid has no candidate that leaves a step of {num_steps} sparse: lower the "
                          "dense first or last steps")
    trials = schedule_trials(transformer, num_steps, candidates)
    PROGRESS.info(f"reuse schedule search: {len(prompts)} prompts dense, then up to {len(trials)} schedules, "
                  "fastest first")
    validation = validate(pipe, prompts, call_kwargs, trials, min_psnr, seed=config.seed, progress=config.progress)
    if validation.chosen is not None:
        solution, closest = validation.chosen.solution, False
        solution.binding = (f"{solution.binding}: mean PSNR {validation.chosen.mean_psnr:.1f} dB against dense >= "
                            f"{min_psnr:g} dB on {len(prompts)} prompts (schedule {len(validation.trials)} of "
                            f"{len(trials)}, fastest first)")
    else:
        best = highest_psnr(validation.trials)
        failure = (f"no schedule reached mean PSNR {min_psnr:g} dB against dense on {len(prompts)} prompts: the best "
                   f"of {len(validation.trials)} reached {best.mean_psnr:.1f} dB ({best.variant})")
        if not config.allow_closest:
            raise SearchError(f"{failure}. No plan written (lower `min_psnr`, or pass `allow_closest` to write the "
                              "schedule with the highest PSNR)")
        PROGRESS.warning(f"{failure}; writing the schedule with the highest PSNR (`allow_closest`)")
        solution, closest = best.solution, True
        solution.binding = f"{solution.binding}; closest to --min-psnr {min_psnr:g}: mean PSNR {best.mean_psnr:.1f} dB"
    solution.plan.calibration.update({"binding": solution.binding, "prompts": list(prompts),
                                      "end_to_end_check": validation.to_json(),
                                      "predicted": {"executed_density": solution.metrics["executed_density"],
                                                    "attention_speedup": solution.metrics["attention_speedup"]}})
    return solution, validation, closest


def write_schedule_report(solution: Solution, validation: Validation, path: Path, command: str | None = None) -> None:
    """A markdown list of every schedule tried, in the order tried, and the one kept; `command`: the command line
    that ran the search, when known."""
    ran = [f"Command: `{command}`", ""] if command else []
    lines = ["# Reuse schedule search", "", *ran, solution.binding, "",
             f"Calibration prompts ({len(validation.prompts)}): " + "; ".join(validation.prompts), "",
             "| schedule | executed density | predicted attention speedup | mean PSNR dB | min PSNR dB |",
             "|---|---|---|---|---|"]
    for trial in validation.trials:
        m = trial.solution.metrics
        lines.append(f"| {trial.variant} | {m['executed_density']:.1%} | {m['attention_speedup']:.2f}x | "
                     f"{trial.mean_psnr:.1f} | {min(trial.psnr):.1f} |")
    write_text(path, "\n".join(lines) + "\n")


__all__ = ["ReuseSchedule", "ScheduleGrid", "fastest_schedule", "schedule_grid", "schedule_trials",
           "write_schedule_report"]
