"""The search's optimisation problem: per (module, head, candidate) the calibrated error (weighted by layer and step
sensitivities), density and predicted time, which candidates each head may take, and the exact objective of an
assignment with head-group launches (heads sharing a strategy in a layer run in one launch).

A re-scaled or `reuse` candidate also runs dense at every refresh (every `refresh_interval` sparse steps): its
time and density carry that share of a dense head on top of its layout's.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .cost import CostModel
from .errors import BudgetError
from .stats import CalibrationStats

logger = logging.getLogger(__name__)


def layer_weight_values(stats: CalibrationStats, kind: str) -> np.ndarray:
    """Per-layer error weights (mean 1): the measured sensitivities, or ones."""
    if kind not in ("sensitivity", "none"):
        # Worded as the flag: tests that call the solver assert this text.
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
        # Worded as the flag: tests that call the solver assert this text.
        raise BudgetError(f"--step-weights must be one of {', '.join(STEP_WEIGHTS)}, got {kind!r}")
    if kind == "none":
        return None
    if not stats.has_step_weights():
        raise BudgetError("`step_weights` sensitivity: these statistics have no per-step errors or step "
                          "sensitivities (captured by an older dit-sparse, or by a pipeline without "
                          "callback_on_step_end); calibrate again, or use `step_weights` none")
    values = stats.info["step_sensitivity"]
    weights = {int(step): float(v) for step, v in values}
    if not all(np.isfinite(w) and w > 0 for w in weights.values()):
        raise BudgetError(f"`step_weights` sensitivity: measured step sensitivities are not all positive: {values}")
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
        self.dense_index = next(i for i, x in enumerate(cands) if x.dense and not x.fp8)
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
            raise BudgetError(f"`dense_layers`: no covered layer {unknown[0]} (layers are "
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
            raise BudgetError(f"`dense_first` {dense_first} leaves no sparse step out of {self.num_steps}")
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
