"""Which denoising steps calibration samples, and what earlier steps leave for them.

Re-scaled and ``reuse`` candidates use, between dense refreshes, what their last refresh computed: the re-scale
statistics, or the dense output. Their error at a sampled step depends on how old that is, so the observer keeps,
for the ``refresh_interval - 1`` steps before every sampled step, a :class:`HistoryEntry` on the scored rows, and
scores those candidates as the mean over ages 0 ... refresh_interval - 1 (see the `calibration` module docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .candidates import Candidate
from .errors import CalibrationError
from .partial_sums import PartialSums, dense_output, rescale_statistics, rescaled_outputs


def sample_steps(num_steps: int, dense_first: float, count: int) -> list[int]:
    """`count` denoising steps spread evenly over the steps the plan will run sparse (first and last included)."""
    first = int(round(dense_first * num_steps))
    if first >= num_steps:
        raise CalibrationError(f"dense_first={dense_first} leaves no sparse step out of {num_steps}")
    picks = np.linspace(first, num_steps - 1, max(1, min(count, num_steps - first)))
    return sorted({int(round(x)) for x in picks})


def history_steps(steps: list[int], first_sparse_step: int, refresh_interval: int,
                  extrapolate: bool = False) -> set[int]:
    """Steps whose re-scale statistics or dense output a sampled step of `steps` reuses: the refresh_interval - 1
    before each (a plan refreshes at its first sparse step, so none before that); with `extrapolate`, also the
    step each of those extrapolates from (see `previous_step`)."""
    refreshes = {s - a for s in steps for a in range(1, refresh_interval) if s - a >= first_sparse_step}
    if not extrapolate:
        return refreshes
    earlier = {previous_step(r, first_sparse_step, refresh_interval) for r in refreshes}
    return refreshes | {p for p in earlier if p is not None}


def previous_step(refresh: int, first_sparse_step: int, refresh_interval: int) -> int | None:
    """The computed output an extrapolating `reuse` refreshed at `refresh` continues from, as the processor does:
    the refresh before (refresh_interval steps back), or the last dense step when that one lies in the warm-up."""
    if refresh - refresh_interval >= first_sparse_step:
        return refresh - refresh_interval
    return refresh - 1 if refresh >= 1 else None


@dataclass
class HistoryEntry:
    """What one step of one module and branch leaves on its scored rows (the query blocks `blocks`, (J,))."""

    blocks: torch.Tensor
    levels: torch.Tensor | None = None  # (B, H, J, C', NK) the re-scaled candidates' levels at this step
    ratio: torch.Tensor | None = None  # (B, H, J, C', bq) their in-layout share of the dense mass
    residual: torch.Tensor | None = None  # (B, H, J, C', bq, D) dense minus re-scaled sparse output
    dense: torch.Tensor | None = None  # (B, H, J, bq, D) the dense output, for `reuse`


class StepHistory:
    """HistoryEntry per (module index, branch, step) for the refresh-based candidates among `candidates`, kept
    for the steps that a sampled step of `steps` reuses and forgotten once no later sampled step can."""

    def __init__(self, candidates: list[Candidate], num_heads: int, steps: list[int], first_sparse_step: int,
                 refresh_interval: int):
        self.candidates, self.num_heads = candidates, num_heads
        self.first_sparse_step, self.refresh_interval = first_sparse_step, refresh_interval
        self.rescaled = [ci for ci, c in enumerate(candidates) if c.rescale]
        self.reused = [ci for ci, c in enumerate(candidates) if c.reuses]
        self.refreshing = bool(self.rescaled or self.reused)
        extrapolate = any(candidates[ci].spec.param_dict["extrapolate"] for ci in self.reused)
        self.steps = history_steps(steps, first_sparse_step, refresh_interval, extrapolate) \
            if self.refreshing else set()
        self._span = refresh_interval * (2 if extrapolate else 1)
        self.entries: dict[tuple[int, str, int], HistoryEntry] = {}

    def forget(self, mi: int, branch: str, step: int) -> None:
        """Drop statistics no later sampled step can use (too old, or left by the previous generation)."""
        stale = [key for key in self.entries
                 if key[0] == mi and key[1] == branch and not step - self._span < key[2] < step]
        for key in stale:
            del self.entries[key]

    def fill(self, entry: HistoryEntry, hs: slice, sums: PartialSums) -> None:
        """Heads `hs` of `entry` from their partial sums at this step."""
        if self.reused:
            dense = dense_output(sums)  # (B, h, J, bq, D)
            if entry.dense is None:
                entry.dense = dense.new_zeros(dense.shape[0], self.num_heads, *dense.shape[2:])
            entry.dense[:, hs] = dense
        if not self.rescaled:
            return
        ratio, residual = rescale_statistics(sums, entry.levels[:, hs])
        if entry.ratio is None:
            b, _, nj, c, bq = ratio.shape
            entry.ratio = ratio.new_zeros(b, self.num_heads, nj, c, bq)
            entry.residual = residual.new_zeros(b, self.num_heads, nj, c, bq, residual.shape[-1])
        entry.ratio[:, hs], entry.residual[:, hs] = ratio, residual

    def before(self, where: tuple[int, str, int], blocks: torch.Tensor, batch: int) -> list[HistoryEntry]:
        """The kept re-scale statistics of the refresh_interval - 1 steps before this one (those that exist)."""
        mi, branch, step = where
        out = []
        for age in range(1, min(self.refresh_interval, step - self.first_sparse_step + 1)):
            entry = self.entries.get((mi, branch, step - age))
            if entry is not None and entry.ratio is not None and entry.ratio.shape[0] == batch \
                    and torch.equal(entry.blocks, blocks):
                out.append(entry)
        return out

    def rescaled_errors(self, history: list[HistoryEntry], hs: slice, sums: PartialSums, dense, valid,
                        all_valid: bool) -> np.ndarray:
        """(h, C') squared errors of the re-scaled candidates, averaged over the ages of their statistics: 0 (the
        refresh, exact) and each kept earlier step."""
        total = np.zeros((dense.shape[1], len(self.rescaled)))
        for entry in history:
            out = rescaled_outputs(sums, entry.levels[:, hs], entry.ratio[:, hs], entry.residual[:, hs])
            diff = (out - dense.unsqueeze(3)).square().sum(-1)  # (B, h, J, C', bq)
            if not all_valid:
                diff = diff * valid[None, None, :, None, :]
            total += diff.sum((0, 2, 4)).double().cpu().numpy()
        return total / (len(history) + 1)

    def reused_errors(self, where, blocks, batch: int, hs: slice, dense, valid, all_valid: bool) -> np.ndarray:
        """(h, C') squared errors of the `reuse` candidates: their output from a refresh `age` steps ago against
        this step's dense output, averaged over ages 0 (the refresh, exact) ... refresh_interval - 1."""
        mi, branch, step = where
        total = np.zeros((dense.shape[1], len(self.reused)))
        ages = 1  # age 0, exact
        for age in range(1, min(self.refresh_interval, step - self.first_sparse_step + 1)):
            kept = self._kept_dense(mi, branch, step - age, blocks, batch)
            if kept is None:
                continue
            ages += 1
            before = previous_step(step - age, self.first_sparse_step, self.refresh_interval)
            earlier = None if before is None else self._kept_dense(mi, branch, before, blocks, batch)
            for i, ci in enumerate(self.reused):
                out = kept[:, hs]
                if earlier is not None and self.candidates[ci].spec.param_dict["extrapolate"]:
                    out = out + (out - earlier[:, hs]) * (age / (step - age - before))
                diff = (out - dense).square().sum(-1)  # (B, h, J, bq)
                if not all_valid:
                    diff = diff * valid[None, None]
                total[:, i] += diff.sum((0, 2, 3)).double().cpu().numpy()
        return total / ages

    def _kept_dense(self, mi: int, branch: str, step: int, blocks, batch: int) -> torch.Tensor | None:
        entry = self.entries.get((mi, branch, step))
        if entry is None or entry.dense is None or entry.dense.shape[0] != batch \
                or not torch.equal(entry.blocks, blocks):
            return None
        return entry.dense
