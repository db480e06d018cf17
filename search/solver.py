"""Choose one candidate per head: fastest plan under an error budget, or most faithful plan under a speed or
density target.

Quantities (all predicted from calibration statistics and the cost model):

- error: mean over covered heads of each head's normalised squared error, i.e. the mean over layers of the
  relative squared error of the attention output; budgets and reports use its square root, the relative L2
  error (`max_error=0.1` means 10%);
- time: attention time of one generation, dense warm-up steps and dense layers included, where a layer's
  time is the sum over its head groups (heads sharing a strategy run in one launch) of launch overhead plus
  per-head work;
- density: mean over covered heads of the fraction of dense attention work during the sparse steps.

The arrays and the exact objective are `problem.Problem`'s; the assignment is found by `optimize` (Lagrangian
relaxation, then a local search with head fusion). Budget options that name no setting of the command line word it
as its configuration field in backquotes (see `errors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dit_sparse.plan import DENSE, Schedule, SparsePlan

from .cost import CostModel
from .errors import BudgetError, SearchError
from .optimize import frontier, local_search, min_error_under, min_time_under_error, relax
from .problem import Problem
from .stats import CalibrationStats


class InfeasibleBudget(SearchError):
    """No plan meets the budget. `closest` is the nearest plan (written only when the user allows it)."""

    def __init__(self, message: str, closest: Solution):
        super().__init__(message)
        self.closest = closest


@dataclass(frozen=True)
class Budget:
    """Exactly one of target_speedup / target_density, or neither; max_error alone or as an extra limit."""

    max_error: float | None = None
    target_speedup: float | None = None
    target_density: float | None = None

    def validate(self) -> None:
        if self.target_speedup is not None and self.target_density is not None:
            raise BudgetError("give `target_speedup` or `target_density`, not both")
        if self.max_error is not None and not self.max_error >= 0:
            raise BudgetError(f"`max_error` must be a relative L2 error >= 0, got {self.max_error}")
        if self.target_speedup is not None and not self.target_speedup >= 1.0:
            raise BudgetError(f"`target_speedup` must be >= 1, got {self.target_speedup}")
        if self.target_density is not None and not 0.0 <= self.target_density <= 1.0:
            raise BudgetError(f"`target_density` must be a fraction in [0, 1], got {self.target_density}")

    def describe(self) -> str:
        parts = []
        if self.target_speedup is not None:
            parts.append(f"attention speedup >= {self.target_speedup:g}x")
        if self.target_density is not None:
            parts.append(f"density <= {self.target_density:.1%}")
        if self.max_error is not None:
            parts.append(f"relative L2 error <= {self.max_error:g}")
        return ", ".join(parts) or "none"


@dataclass
class Solution:
    assign: np.ndarray  # (M, H) candidate index per head
    plan: SparsePlan
    metrics: dict[str, Any]
    binding: str
    feasible: bool = True
    frontier: list[dict[str, float]] = field(default_factory=list)


def solve(stats: CalibrationStats, cost: CostModel, budget: Budget, *, dense_first: float = 0.2,
          dense_layers: tuple[int, ...] = (), refresh_interval: int | None = None,
          wall_seconds: float | None = None, layer_weights: str = "sensitivity",
          families: tuple[str, ...] | None = None, step_weights: str = "none",
          rescaled_only: bool = False) -> Solution:
    """The plan for `budget`. Raises InfeasibleBudget (with the closest plan) when it cannot be met.

    layer_weights: "sensitivity" weights each layer's attention error by its measured effect on the transformer
    output (when the statistics have it; mean weight 1), "none" counts every layer alike. families: only
    candidates of these strategy families (and dense, always allowed); None for all. rescaled_only: only
    re-scaled candidates (and dense and skip). step_weights:
    "sensitivity" weights each sampled step's error by its measured effect on the generated result, "none"
    averages the steps alike.
    """
    budget.validate()
    prob = Problem(stats, cost, dense_first, dense_layers, layer_weights, families, step_weights, refresh_interval,
                   rescaled_only)
    refresh = prob.refresh_interval

    if budget.target_speedup is None and budget.target_density is None:
        max_error = budget.max_error if budget.max_error is not None else DEFAULT_MAX_ERROR
        a, note = min_time_under_error(prob, max_error)
        sol = _solution(prob, a, budget, note, dense_first, dense_layers, refresh, wall_seconds)
        sol.frontier = frontier(prob)
        return sol

    if budget.target_speedup is not None:
        limit = prob.step_budget_for_speedup(budget.target_speedup)
        g_name, target = "time", f"attention speedup {budget.target_speedup:g}x"
    else:
        limit = budget.target_density
        g_name, target = "density", f"density {budget.target_density:.1%}"
    fastest = relax(prob, prob.metric(g_name), prob.metric("error"), 0.0)
    fastest, _ = local_search(prob, fastest, g_name, "error", np.inf)
    best_g = prob.totals(fastest)[g_name]
    if best_g > limit + 1e-12:
        closest_a, _ = min_error_under(prob, g_name, best_g)
        reason = _why_unreachable(prob, g_name, fastest)
        closest = _solution(prob, closest_a, budget, f"closest to the unreachable {target}", dense_first,
                            dense_layers, refresh, wall_seconds, feasible=False)
        closest.frontier = frontier(prob)
        raise InfeasibleBudget(f"cannot reach {target}: {reason}", closest)
    a, blocked = min_error_under(prob, g_name, limit)
    note = (f"the {target} target is binding: predicted {_fmt_g(prob, g_name, a)}; lower error needs more "
            f"{'time' if g_name == 'time' else 'density'}" if blocked else
            f"the {target} target is not binding: every head runs its most faithful candidate "
            f"({_fmt_g(prob, g_name, a)})")
    if budget.max_error is not None and math.sqrt(max(prob.error(a), 0.0)) > budget.max_error + 1e-12:
        got = math.sqrt(prob.error(a))
        closest_a, _ = min_time_under_error(prob, budget.max_error)
        closest = _solution(prob, closest_a, budget, f"fastest plan within relative L2 error {budget.max_error:g} "
                            f"(falls short of the {target})", dense_first, dense_layers, refresh, wall_seconds,
                            feasible=False)
        closest.frontier = frontier(prob)
        # Worded as the flag: tests that call the solver assert this text.
        raise InfeasibleBudget(f"cannot reach {target} within --max-error {budget.max_error:g}: the most faithful "
                               f"plan at that target has relative L2 error {got:.4f}; the fastest plan within "
                               f"the error budget reaches {_fmt_g(prob, g_name, closest_a)}", closest)
    sol = _solution(prob, a, budget, note, dense_first, dense_layers, refresh, wall_seconds)
    if budget.max_error is not None:
        sol.binding += (f"; --max-error {budget.max_error:g} holds "
                        f"(relative L2 error {sol.metrics['relative_l2_error']:.4f})")
    sol.frontier = frontier(prob)
    return sol


DEFAULT_MAX_ERROR = 0.1


def _fmt_g(prob: Problem, g_name: str, a: np.ndarray) -> str:
    if g_name == "time":
        return f"attention speedup {prob.max_speedup(a):.2f}x"
    return f"density {prob.density(a):.1%}"


def _why_unreachable(prob: Problem, g_name: str, fastest: np.ndarray) -> str:
    if g_name == "time":
        dense_share = prob.dense_steps * prob.shape[0] * prob.dense_layer * prob.calls_per_step / prob.total_dense
        parts = [f"the fastest possible plan reaches {prob.max_speedup(fastest):.2f}x"]
        if prob.dense_steps:
            parts.append(f"the {prob.dense_steps} dense warm-up steps alone take {dense_share:.0%} of dense "
                         f"attention time (`dense_first` {prob.dense_first:g})")
        if prob.dense_layers:
            parts.append(f"layers {list(prob.dense_layers)} stay dense (`dense_layers`)")
        return "; ".join(parts)
    parts = [f"the sparsest possible plan has density {prob.density(fastest):.1%}"]
    if prob.dense_layers:
        parts.append(f"layers {list(prob.dense_layers)} stay dense (`dense_layers`)")
    return "; ".join(parts)


def _solution(prob: Problem, a: np.ndarray, budget: Budget, note: str, dense_first: float,
              dense_layers: tuple[int, ...], refresh: int, wall_seconds: float | None,
              feasible: bool = True) -> Solution:
    stats = prob.stats
    modules = {}
    for mi, name in enumerate(stats.modules):
        modules[name] = tuple(stats.spec(mi, hi, int(ci)) for hi, ci in enumerate(a[mi]))
    schedule = Schedule(dense_first=float(dense_first), dense_layers=tuple(sorted(set(dense_layers))),
                        refresh_interval=refresh)
    metrics = predicted_metrics(prob, a, wall_seconds)
    calibration = {
        "source": "dit-sparse search",
        "model": stats.info.get("model"),
        "prompts": stats.info.get("prompts"),
        "steps": prob.num_steps,
        "grid": [stats.grid.frames, stats.grid.height, stats.grid.width],
        "blocks": [stats.block_q, stats.block_k],
        "executor": stats.info.get("executor"),
        "device": stats.info.get("device"),
        "cost_model": prob.cost.kind,
        "error_weights": "layer sensitivity" if not np.all(prob.weights == 1) else "none",
        "step_weights": "step sensitivity" if prob.step_weights is not None else "none",
        "budget": budget.describe(),
        "binding": note,
        "predicted": {k: metrics[k] for k in ("relative_l2_error", "density", "executed_density",
                                              "attention_speedup", "end_to_end_speedup")},
    }
    plan = SparsePlan(stats.fingerprint, modules, DENSE, schedule, calibration)
    return Solution(a, plan, metrics, note, feasible)


def predicted_metrics(prob: Problem, a: np.ndarray, wall_seconds: float | None = None) -> dict[str, Any]:
    err = prob.error(a)
    density = prob.density(a)
    total = prob.total_time(a)
    speedup = prob.total_dense / total if total > 0 else float("inf")
    e2e = None
    if prob.cost.kind == "measured" and wall_seconds:
        # Time saved per generation by the cost model, at most the attention time measured in the calibration
        # run scaled by the predicted attention speedup (timings in isolation and in the run may differ).
        saved = prob.total_dense - total
        measured = prob.stats.info.get("attention_seconds_per_generation") or wall_seconds
        saved = min(saved, min(measured, wall_seconds) * (1.0 - total / prob.total_dense))
        e2e = wall_seconds / max(wall_seconds - saved, 1e-9)
    raw_err = np.take_along_axis(prob.raw_err, a[..., None], 2)[..., 0]
    per_head_dens = np.take_along_axis(prob.dens, a[..., None], 2)[..., 0]
    return {
        "error": err,
        "relative_l2_error": math.sqrt(max(err, 0.0)),
        "unweighted_relative_l2_error": math.sqrt(max(float(raw_err.mean()), 0.0)),
        "layer_weights": prob.weights.tolist(),
        "step_weights": None if prob.step_weights is None else [[k, v] for k, v in sorted(prob.step_weights.items())],
        "layer_relative_l2_error": np.sqrt(np.maximum(raw_err.mean(1), 0)).tolist(),
        "density": density,
        "executed_density": (prob.dense_steps + prob.sparse_steps * density) / prob.num_steps,
        "attention_speedup": speedup,
        "sparse_step_attention_speedup": prob.shape[0] * prob.dense_layer / prob.step_time(a)
        if prob.step_time(a) > 0 else float("inf"),
        "end_to_end_speedup": e2e,
        "attention_seconds_dense": prob.total_dense if prob.cost.kind == "measured" else None,
        "attention_seconds_plan": total if prob.cost.kind == "measured" else None,
        "head_error": raw_err.tolist(),
        "head_density": per_head_dens.tolist(),
        "groups_per_layer": [len({prob.stats.spec(mi, hi, int(ci)) for hi, ci in enumerate(a[mi])
                                      if prob.computes[ci]}) for mi in range(prob.shape[0])],
        "dense_steps": prob.dense_steps,
        "num_steps": prob.num_steps,
    }


def assignment_of(stats: CalibrationStats, plan: SparsePlan) -> np.ndarray:
    """(M, H) candidate index of every head of an existing plan, matching specs exactly or, for static
    strategies, by identical layout at the statistics' block sizes. Raises BudgetError when a head's strategy
    was not among the calibrated candidates."""
    from .candidates import Candidate, static_level_map

    mismatch = stats.fingerprint.mismatch(plan.model)
    if mismatch:
        raise BudgetError(f"the plan is for another model ({mismatch})")
    layouts = {}
    for ci, cand in enumerate(stats.candidates):
        if cand.spec is not None and not cand.dynamic and cand.computes:
            layouts[ci] = static_level_map(cand, stats.grid, stats.block_q, stats.block_k)
    a = np.zeros((len(stats.modules), stats.fingerprint.num_heads), dtype=np.int64)
    for mi, name in enumerate(stats.modules):
        for hi, spec in enumerate(plan.heads_for(name)):
            found = [ci for ci in range(len(stats.candidates)) if stats.spec(mi, hi, ci) == spec]
            static = spec.impl.computes and not spec.impl.dynamic and not spec.impl.dense
            if not found and static:
                levels = static_level_map(Candidate(spec.describe(), spec.strategy, spec), stats.grid, stats.block_q,
                                          stats.block_k)
                found = [ci for ci, lv in layouts.items() if stats.candidates[ci].fp8 == spec.fp8
                         and stats.candidates[ci].rescale == spec.rescale and torch.equal(lv, levels)]
                if not found and bool((levels == 0).all()):
                    found = [next(i for i, c in enumerate(stats.candidates) if c.dense and not c.fp8)]
            if not found:
                raise BudgetError(f"{name} head {hi}: {spec.describe()} was not calibrated")
            a[mi, hi] = found[0]
    return a


def evaluate_plan(stats: CalibrationStats, cost: CostModel, plan: SparsePlan, wall_seconds: float | None = None,
                  layer_weights: str = "sensitivity", step_weights: str = "none") -> dict[str, Any]:
    """Predicted metrics (error, density, speedups) of an existing plan from the statistics."""
    prob = Problem(stats, cost, plan.schedule.dense_first, plan.schedule.dense_layers, layer_weights,
                   step_weights=step_weights, refresh_interval=plan.schedule.refresh_interval)
    a = assignment_of(stats, plan)
    for mi, layer in enumerate(stats.layers):
        if layer in plan.schedule.dense_layers:
            a[mi] = prob.dense_index
    return predicted_metrics(prob, a, wall_seconds)
