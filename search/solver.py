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

A re-scaled candidate also runs dense at every refresh (every `refresh_interval` sparse steps): its time and
density carry that share of a dense head on top of its layout's.

Method: Lagrangian relaxation (each head independently minimises objective + multiplier x constraint, with
launch overheads shared evenly by a layer's heads), a bisection on the multiplier to meet the budget, then a
local search on the exact objective with single-head and whole-group moves, which is where head fusion happens:
a small group merges into another strategy of its layer when the launch it saves pays for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dit_sparse.plan import DENSE, Schedule, SparsePlan

from .cost import CostModel
from .errors import SearchError
from .stats import CalibrationStats

logger = logging.getLogger(__name__)

_TOL = 1e-12


class BudgetError(SearchError):
    """Budget options that make no sense together (or out of range)."""


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
            raise BudgetError("give --target-speedup or --target-density, not both")
        if self.max_error is not None and not self.max_error >= 0:
            raise BudgetError(f"--max-error must be a relative L2 error >= 0, got {self.max_error}")
        if self.target_speedup is not None and not self.target_speedup >= 1.0:
            raise BudgetError(f"--target-speedup must be >= 1, got {self.target_speedup}")
        if self.target_density is not None and not 0.0 <= self.target_density <= 1.0:
            raise BudgetError(f"--target-density must be a fraction in [0, 1], got {self.target_density}")

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


def layer_weight_values(stats: CalibrationStats, kind: str) -> np.ndarray:
    """Per-layer error weights (mean 1): the measured sensitivities, or ones."""
    if kind not in ("sensitivity", "none"):
        raise BudgetError(f"--layer-weights must be 'sensitivity' or 'none', got {kind!r}")
    values = stats.info.get("layer_sensitivity")
    m = len(stats.modules)
    if kind == "none" or not values or len(values) != m or not np.all(np.isfinite(values)) or min(values) <= 0:
        return np.ones(m)
    values = np.asarray(values, dtype=np.float64)
    return values / values.mean()


STEP_WEIGHTS = ("none", "sensitivity")


def step_weight_values(stats: CalibrationStats, kind: str) -> dict[int, float] | None:
    """Per sampled step error weights: the measured step sensitivities, or None (the plain mean over steps)."""
    if kind not in STEP_WEIGHTS:
        raise BudgetError(f"--step-weights must be one of {', '.join(STEP_WEIGHTS)}, got {kind!r}")
    if kind == "none":
        return None
    if not stats.has_step_weights():
        raise BudgetError("--step-weights sensitivity: these statistics have no per-step errors or step "
                          "sensitivities (captured by an older dit-sparse, or by a pipeline without "
                          "callback_on_step_end); calibrate again, or use --step-weights none")
    values = stats.info["step_sensitivity"]
    weights = {int(step): float(v) for step, v in values}
    if not all(np.isfinite(w) and w > 0 for w in weights.values()):
        raise BudgetError(f"--step-weights sensitivity: measured step sensitivities are not all positive: {values}")
    return weights


class Problem:
    """Arrays over (module m, head h, candidate c) and the exact objective with head-group launches."""

    def __init__(self, stats: CalibrationStats, cost: CostModel, dense_first: float, dense_layers: tuple[int, ...],
                 layer_weights: str = "sensitivity", families: tuple[str, ...] | None = None,
                 step_weights: str = "none", refresh_interval: int | None = None, rescaled_only: bool = False):
        self.stats, self.cost = stats, cost
        m, h, c = stats.error.shape
        self.shape = (m, h, c)
        cands = stats.candidates
        self.dense_index = next(i for i, x in enumerate(cands) if x.family == "dense" and not x.fp8)
        self.step_weights = step_weight_values(stats, step_weights)
        self.raw_err = np.nan_to_num(stats.error_over_steps(self.step_weights), nan=np.inf)
        self.weights = layer_weight_values(stats, layer_weights)
        self.err = self.raw_err * self.weights[:, None, None]
        self.dens = np.nan_to_num(stats.density, nan=1.0)
        self.p = np.zeros((m, h, c))
        for ci, cand in enumerate(cands):
            for mi in range(m):
                for hi in range(h):
                    self.p[mi, hi, ci] = cost.head_time(cand, float(self.dens[mi, hi, ci]))
        self.o = np.array([cost.group_overhead(x) for x in cands])
        self.perhead = np.array([x.per_head for x in cands])
        self.computes = np.array([x.computes for x in cands])
        self.allowed = np.isfinite(self.err)
        if families is not None:
            known = {x.family for x in cands}
            unknown = sorted(set(families) - known)
            if unknown:
                raise BudgetError(f"families: no candidate of family {unknown[0]!r} was calibrated (calibrated: "
                                  f"{', '.join(sorted(known))})")
            self.allowed &= np.array([x.family in families for x in cands])[None, None, :]
        if rescaled_only:
            if not any(x.rescale for x in cands):
                raise BudgetError("re-scaled strategies only: these statistics have no re-scaled candidates "
                                  "(calibrated by an older dit-sparse); calibrate again")
            self.allowed &= np.array([x.rescale or not (x.computes or x.reuses) for x in cands])[None, None, :]
        self.dense_layers = tuple(sorted(set(dense_layers)))
        unknown = sorted(set(self.dense_layers) - set(stats.layers))
        if unknown:
            raise BudgetError(f"--dense-layers: no covered layer {unknown[0]} (layers are "
                              f"{min(stats.layers)}..{max(stats.layers)})")
        for mi, layer in enumerate(stats.layers):
            if layer in self.dense_layers:
                self.allowed[mi] = False
                self.allowed[mi, :, self.dense_index] = True
        self.allowed[:, :, self.dense_index] = True
        info = stats.info
        self.num_steps = int(info.get("num_steps", 1))
        self.dense_first = dense_first
        self.dense_steps = int(round(dense_first * self.num_steps))
        self.sparse_steps = self.num_steps - self.dense_steps
        if self.sparse_steps <= 0:
            raise BudgetError(f"--dense-first {dense_first} leaves no sparse step out of {self.num_steps}")
        calibrated_first = info.get("dense_first")
        if calibrated_first is not None and dense_first < calibrated_first - 1e-9:
            logger.warning("errors were measured on steps from %.0f%% of denoising on; dense_first=%.2f runs "
                           "earlier steps sparse too, where the error may be larger", 100 * calibrated_first,
                           dense_first)
        self.calls_per_step = float(info.get("calls_per_step", 1.0))
        self.refresh_interval = int(refresh_interval or info.get("refresh_interval", 5))
        self._add_refreshes(cands)
        self.dense_layer = cost.dense_layer
        self.total_dense = self.calls_per_step * self.num_steps * m * self.dense_layer

    def _add_refreshes(self, cands) -> None:
        """Re-scaled heads run dense (besides their layout) and `reuse` heads run dense (instead of nothing) at
        ceil(sparse steps / refresh interval) of the sparse steps; their errors were calibrated for the
        calibration's interval only."""
        refreshing = np.array([x.refreshes for x in cands])
        if not refreshing.any():
            return
        calibrated = int(self.stats.info.get("refresh_interval", 5))
        if self.refresh_interval != calibrated:
            logger.warning("re-scaled and reuse candidates were calibrated with a refresh every %d steps, not %d: "
                           "they are left out", calibrated, self.refresh_interval)
            self.allowed &= ~refreshing[None, None, :]
        share = refresh_share(self.sparse_steps, self.refresh_interval)
        dense = cands[self.dense_index]
        self.p[:, :, refreshing] += share * self.cost.head_time(dense, 1.0)
        self.o = np.where(refreshing, self.o + share * self.cost.group_overhead(dense), self.o)
        self.dens[:, :, refreshing] += share

    # -- exact quantities --------------------------------------------------------------------------------------
    def layer_times(self, a: np.ndarray) -> np.ndarray:
        p = np.take_along_axis(self.p, a[..., None], 2)[..., 0].sum(1)
        counts = self.counts(a)
        groups = np.where(self.perhead[None, :], counts, counts > 0)
        return p + (groups * self.o[None, :]).sum(1)

    def counts(self, a: np.ndarray) -> np.ndarray:
        m, _, c = self.shape
        out = np.zeros((m, c), dtype=np.int64)
        for mi in range(m):
            out[mi] = np.bincount(a[mi], minlength=c)
        return out

    def step_time(self, a: np.ndarray) -> float:
        """Attention time of the covered layers in one sparse step call."""
        return float(self.layer_times(a).sum())

    def total_time(self, a: np.ndarray) -> float:
        m = self.shape[0]
        return self.calls_per_step * (self.dense_steps * m * self.dense_layer + self.sparse_steps * self.step_time(a))

    def error(self, a: np.ndarray) -> float:
        return float(np.take_along_axis(self.err, a[..., None], 2).mean())

    def density(self, a: np.ndarray) -> float:
        return float(np.take_along_axis(self.dens, a[..., None], 2).mean())

    def step_budget_for_speedup(self, speedup: float) -> float:
        m = self.shape[0]
        target_total = self.total_dense / speedup
        return (target_total / self.calls_per_step - self.dense_steps * m * self.dense_layer) / self.sparse_steps

    def max_speedup(self, a: np.ndarray) -> float:
        total = self.total_time(a)
        return self.total_dense / total if total > 0 else float("inf")

    # -- per-head arrays for the relaxation ----------------------------------------------------------------------
    def metric(self, name: str) -> np.ndarray:
        """Per-head additive version of a metric; time shares a layer's group launches evenly among its heads."""
        h = self.shape[1]
        if name == "time":
            return self.p + np.where(self.perhead, self.o, self.o / h)[None, None, :]
        if name == "error":
            return self.err
        return self.dens

    def totals(self, a: np.ndarray) -> dict[str, float]:
        return {"time": self.step_time(a), "error": self.error(a), "density": self.density(a)}


def refresh_share(sparse_steps: int, refresh_interval: int) -> float:
    """Fraction of the sparse steps at which a re-scaled or `reuse` head refreshes (runs dense)."""
    return math.ceil(sparse_steps / refresh_interval) / sparse_steps


def candidate_density(stats: CalibrationStats, ci: int, share: float) -> float:
    """Candidate `ci`'s calibrated density in sparse steps, mean over covered heads; a re-scaled or `reuse`
    candidate's includes its dense refreshes (`share`, from refresh_share)."""
    return float(np.nanmean(stats.density[:, :, ci])) + share * stats.candidates[ci].refreshes


def _relax(prob: Problem, f: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:
    """Each head's argmin of f + lam * g over allowed candidates (ties: lower g, then lower f)."""
    scale_f = np.abs(f[np.isfinite(f)]).max(initial=1.0) or 1.0
    scale_g = np.abs(g[np.isfinite(g)]).max(initial=1.0) or 1.0
    total = f + lam * g + 1e-9 * (g / scale_g) * scale_f + 1e-12 * scale_f * (f / scale_f)
    total = np.where(prob.allowed, total, np.inf)
    return np.argmin(total, axis=2)


def _lagrange(prob: Problem, f_name: str, g_name: str, budget: float) -> tuple[np.ndarray, float]:
    """Smallest multiplier whose relaxed solution meets `budget` on the exact g; returns (assignment, lambda)."""
    f, g = prob.metric(f_name), prob.metric(g_name)

    def g_exact(a):
        return prob.totals(a)[g_name]

    a0 = _relax(prob, f, g, 0.0)
    if g_exact(a0) <= budget:
        return a0, 0.0
    finite_f = f[np.isfinite(f) & prob.allowed]
    finite_g = g[np.isfinite(g) & prob.allowed]
    ratio = (np.ptp(finite_f) + 1e-30) / (np.ptp(finite_g) + 1e-30)
    lo, hi = ratio * 1e-9, ratio
    for _ in range(60):
        if g_exact(_relax(prob, f, g, hi)) <= budget:
            break
        lo, hi = hi, hi * 10
    else:
        return _relax(prob, f, g, hi), hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if g_exact(_relax(prob, f, g, mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-6:
            break
    return _relax(prob, f, g, hi), hi


def _deltas(prob: Problem, a: np.ndarray):
    """Exact changes of (time, error sum, density sum) for every single-head move (M, H, C) and every
    whole-group move (M, C, C') of a layer's shared group c to c'."""
    m, h, c = prob.shape
    counts = prob.counts(a)
    cur = a[..., None]
    p_cur = np.take_along_axis(prob.p, cur, 2)
    e_cur = np.take_along_axis(prob.err, cur, 2)
    d_cur = np.take_along_axis(prob.dens, cur, 2)
    own_count = np.take_along_axis(counts, a, 1)
    leave = np.where(prob.perhead[a] | (own_count == 1), prob.o[a], 0.0)[..., None]
    join = np.where(prob.perhead[None, :] | (counts == 0), prob.o[None, :], 0.0)[:, None, :]
    same = np.arange(c)[None, None, :] == cur
    dt = np.where(same, 0.0, prob.p - p_cur + join - leave)
    de = np.where(same, 0.0, prob.err - e_cur)
    dd = np.where(same, 0.0, prob.dens - d_cur)
    single = (dt, de, dd, prob.allowed & ~same)

    onehot = np.zeros((m, h, c))
    np.put_along_axis(onehot, cur, 1.0, 2)
    with np.errstate(invalid="ignore"):
        gp = np.einsum("mhc,mhk->mck", onehot, prob.p)
        ge = np.einsum("mhc,mhk->mck", onehot, np.where(np.isfinite(prob.err), prob.err, 1e30))
        gd = np.einsum("mhc,mhk->mck", onehot, prob.dens)

    def diag(x):
        return np.diagonal(x, axis1=1, axis2=2)[..., None]

    join_g = np.where(prob.perhead[None, None, :], counts[:, :, None] * prob.o[None, None, :],
                      np.where(counts[:, None, :] == 0, prob.o[None, None, :], 0.0))
    gdt = gp - diag(gp) + join_g - prob.o[None, :, None]
    gde, gdd = ge - diag(ge), gd - diag(gd)
    blocked = np.einsum("mhc,mhk->mck", onehot, (~prob.allowed).astype(float)) > 0
    valid = (counts[:, :, None] >= 2) & ~prob.perhead[None, :, None] & ~blocked & \
        (np.arange(c)[None, :, None] != np.arange(c)[None, None, :])
    group = (gdt, gde, gdd, valid)
    return single, group


def _local_search(prob: Problem, a: np.ndarray, f_name: str, g_name: str, budget: float,
                  max_iters: int | None = None) -> tuple[np.ndarray, bool]:
    """Greedy improvement of f under g <= budget with exact group costs: single-head moves, whole-group moves
    (head fusion), and pairs of single moves (one head gives up some f for g that another head spends better).
    Returns (assignment, budget_blocked): whether some move would still improve f but for the budget."""
    a = a.copy()
    heads = prob.shape[0] * prob.shape[1]
    names = {"time": 0, "error": 1, "density": 2}
    fi, gi = names[f_name], names[g_name]
    scale = {"time": 1.0, "error": 1.0 / heads, "density": 1.0 / heads}
    max_iters = max_iters or 20 * heads
    for _ in range(max_iters):
        totals = prob.totals(a)
        g_now, tol = totals[g_name], _TOL * max(1.0, abs(totals[f_name]))
        single, group = _deltas(prob, a)
        best = None
        for kind, moves in (("single", single), ("group", group)):
            df, dg = moves[fi] * scale[f_name], moves[gi] * scale[g_name]
            ok = moves[3] & (df < -tol) & (g_now + dg <= budget + 1e-12)
            if not ok.any():
                continue
            # Moves that also lower g first (largest gain), then the best gain per unit of g spent.
            free = ok & (dg <= 0)
            if free.any():
                idx = np.unravel_index(np.argmin(np.where(free, df, np.inf)), df.shape)
                score = (1, float(-df[idx]))
            else:
                ratio = np.where(ok, -df / np.maximum(dg, 1e-30), -np.inf)
                idx = np.unravel_index(np.argmax(ratio), df.shape)
                score = (0, float(ratio[idx]))
            if best is None or score > best[0]:
                best = (score, kind, idx)
        if best is not None:
            _, kind, idx = best
            if kind == "single":
                mi, hi, ci = idx
                a[mi, hi] = ci
            else:
                mi, c_from, c_to = idx
                a[mi][a[mi] == c_from] = c_to
            continue
        paired = _pair_move(prob, a, single, fi, gi, scale[f_name], scale[g_name], f_name, g_name, budget)
        if paired is None:
            break
        a = paired
    single, group = _deltas(prob, a)
    blocked = False
    tol = _TOL * max(1.0, abs(prob.totals(a)[f_name]))
    for moves in (single, group):
        blocked |= bool((moves[3] & (moves[fi] * scale[f_name] < -tol)).any())
    return a, blocked


def _pair_move(prob: Problem, a: np.ndarray, single, fi: int, gi: int, f_scale: float, g_scale: float,
               f_name: str, g_name: str, budget: float, k: int = 48) -> np.ndarray | None:
    """Best pair of single-head moves (on different heads) that improves f within the budget, checked exactly."""
    df, dg, allowed = single[fi] * f_scale, single[gi] * g_scale, single[3]
    totals = prob.totals(a)
    g_now, f_now = totals[g_name], totals[f_name]
    tol = _TOL * max(1.0, abs(f_now))
    flat_df, flat_dg, flat_ok = df.ravel(), dg.ravel(), allowed.ravel()
    gain = np.flatnonzero(flat_ok & (flat_df < -tol))
    pay = np.flatnonzero(flat_ok & (flat_dg < 0))
    if not len(gain) or not len(pay):
        return None
    gain = gain[np.argsort(flat_df[gain])[:k]]
    # Moves that free the most g for the least f, and those that free the most g at all.
    ratio = flat_df[pay] / -flat_dg[pay]
    pay = np.unique(np.concatenate([pay[np.argsort(ratio)[:k]], pay[np.argsort(flat_dg[pay])[:k]]]))

    def head_of(idx):
        return idx // prob.shape[2]

    total_df = flat_df[gain][:, None] + flat_df[pay][None, :]
    total_dg = flat_dg[gain][:, None] + flat_dg[pay][None, :]
    # Two moves in one layer may share a group launch, which their separate deltas count twice: allow that much
    # slack here and check every pair exactly below.
    slack = 2.0 * float(prob.o.max(initial=0.0))
    f_slack = slack if f_name == "time" else 0.0
    g_slack = slack if g_name == "time" else 0.0
    ok = (total_df < f_slack - tol) & (g_now + total_dg <= budget + g_slack + 1e-12) & \
        (head_of(gain)[:, None] != head_of(pay)[None, :])
    if not ok.any():
        return None
    order = np.argsort(np.where(ok, total_df, np.inf), axis=None)
    for flat in order[: 4 * k]:
        i, j = np.unravel_index(flat, ok.shape)
        if not ok[i, j]:
            break
        trial = a.copy()
        for move in (gain[i], pay[j]):
            mi, hi, ci = np.unravel_index(move, prob.shape)
            trial[mi, hi] = ci
        new = prob.totals(trial)
        if new[f_name] < f_now - tol and new[g_name] <= budget + 1e-12:
            return trial
    return None


# -- public ----------------------------------------------------------------------------------------------------------
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
        a, note = _min_time_under_error(prob, max_error)
        sol = _solution(prob, a, budget, note, dense_first, dense_layers, refresh, wall_seconds)
        sol.frontier = frontier(prob)
        return sol

    if budget.target_speedup is not None:
        limit = prob.step_budget_for_speedup(budget.target_speedup)
        g_name, target = "time", f"attention speedup {budget.target_speedup:g}x"
    else:
        limit = budget.target_density
        g_name, target = "density", f"density {budget.target_density:.1%}"
    fastest = _relax(prob, prob.metric(g_name), prob.metric("error"), 0.0)
    fastest, _ = _local_search(prob, fastest, g_name, "error", np.inf)
    best_g = prob.totals(fastest)[g_name]
    if best_g > limit + 1e-12:
        closest_a, _ = _min_error_under(prob, g_name, best_g)
        reason = _why_unreachable(prob, g_name, fastest)
        closest = _solution(prob, closest_a, budget, f"closest to the unreachable {target}", dense_first,
                            dense_layers, refresh, wall_seconds, feasible=False)
        closest.frontier = frontier(prob)
        raise InfeasibleBudget(f"cannot reach {target}: {reason}", closest)
    a, blocked = _min_error_under(prob, g_name, limit)
    note = (f"the {target} target is binding: predicted {_fmt_g(prob, g_name, a)}; lower error needs more "
            f"{'time' if g_name == 'time' else 'density'}" if blocked else
            f"the {target} target is not binding: every head runs its most faithful candidate "
            f"({_fmt_g(prob, g_name, a)})")
    if budget.max_error is not None and math.sqrt(max(prob.error(a), 0.0)) > budget.max_error + 1e-12:
        got = math.sqrt(prob.error(a))
        closest_a, _ = _min_time_under_error(prob, budget.max_error)
        closest = _solution(prob, closest_a, budget, f"fastest plan within relative L2 error {budget.max_error:g} "
                            f"(falls short of the {target})", dense_first, dense_layers, refresh, wall_seconds,
                            feasible=False)
        closest.frontier = frontier(prob)
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


def _best_of_starts(prob: Problem, f_name: str, g_name: str, limit: float, starts: int = 4):
    """Local search from the Lagrangian solution and from the best feasible uniform plans (one candidate on every
    allowed head); the best result. The relaxation alone can miss a plan as simple as a uniform one."""
    first, _ = _lagrange(prob, f_name, g_name, limit)
    seeds = [first]
    uniform = []
    for c in range(prob.shape[2]):
        a = np.where(prob.allowed[:, :, c], c, prob.dense_index)
        totals = prob.totals(a)
        if totals[g_name] <= limit + 1e-12:
            uniform.append((totals[f_name], a))
    seeds += [a for _, a in sorted(uniform, key=lambda t: t[0])[:starts]]
    best = None
    for seed in seeds:
        a, blocked = _local_search(prob, seed, f_name, g_name, limit)
        if best is None or prob.totals(a)[f_name] < prob.totals(best[0])[f_name] - 1e-15:
            best = (a, blocked)
    return best


def _min_time_under_error(prob: Problem, max_error: float) -> tuple[np.ndarray, str]:
    limit = max_error ** 2
    a, blocked = _best_of_starts(prob, "time", "error", limit)
    got = math.sqrt(max(prob.error(a), 0.0))
    if blocked:
        note = (f"the error budget is binding: relative L2 error {got:.4f} of {max_error:g} allowed; faster plans "
                f"exceed it")
    else:
        note = (f"the error budget is not binding: relative L2 error {got:.4f} of {max_error:g} allowed, and no "
                f"faster plan exists")
    return a, note


def _min_error_under(prob: Problem, g_name: str, limit: float) -> tuple[np.ndarray, bool]:
    return _best_of_starts(prob, "error", g_name, limit)


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
                         f"attention time (--dense-first {prob.dense_first:g})")
        if prob.dense_layers:
            parts.append(f"layers {list(prob.dense_layers)} stay dense (--dense-layers)")
        return "; ".join(parts)
    parts = [f"the sparsest possible plan has density {prob.density(fastest):.1%}"]
    if prob.dense_layers:
        parts.append(f"layers {list(prob.dense_layers)} stay dense (--dense-layers)")
    return "; ".join(parts)


def frontier(prob: Problem, points: int = 14) -> list[dict[str, float]]:
    """Speed/fidelity trade-off: fastest plans for a range of error budgets (for the report)."""
    out, seen = [], set()
    for rel in [0.0] + list(np.geomspace(0.005, 1.0, points - 1)):
        a, _ = _lagrange(prob, "time", "error", rel ** 2)
        key = a.tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append({"max_error": float(rel), "relative_l2_error": math.sqrt(max(prob.error(a), 0.0)),
                    "attention_speedup": prob.max_speedup(a), "density": prob.density(a)})
    return out


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
            if not found and spec.strategy in ("diagonal", "multi_diagonal", "vertical_stripe"):
                levels = static_level_map(Candidate(spec.describe(), spec.strategy, spec), stats.grid, stats.block_q,
                                          stats.block_k)
                found = [ci for ci, lv in layouts.items() if stats.candidates[ci].fp8 == spec.fp8
                         and stats.candidates[ci].rescale == spec.rescale and torch.equal(lv, levels)]
                if not found and bool((levels == 0).all()):
                    found = [next(i for i, c in enumerate(stats.candidates) if c.family == "dense" and not c.fp8)]
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
