"""Captured calibration statistics: what every candidate does to every head, saved so that solving again with
another budget takes seconds.

The file is JSON (format "dit-sparse-search-stats", version 1): the model fingerprint and its covered modules, the
video grid and block sizes it was measured at, the candidates, per (module, head, candidate) the mean normalised
squared error (also per sampled denoising step) and the density, the per-head columns of the mass-chosen stripes,
the calibration settings and the cost table that was used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dit_sparse.atomic import write_json
from dit_sparse.layout import Grid
from dit_sparse.plan import HeadStrategy, ModelFingerprint

from .candidates import Candidate, mass_spec
from .errors import SearchError

STATS_FORMAT = "dit-sparse-search-stats"
STATS_VERSION = 1


class StatsError(SearchError):
    """A statistics file that cannot be used (wrong model, wrong format); the message says which and why."""


@dataclass
class CalibrationStats:
    """error, density: (M, H, C) arrays over covered modules, heads and candidates.

    error is the squared error of the head's attention output against dense, divided by the layer's mean
    per-head dense output energy, averaged over calibration calls; its mean over a layer's heads is that
    layer's relative squared error. density is the fraction of dense attention work (measured for dynamic
    candidates). info holds the calibration settings: num_steps, sample_steps, dense_first, refresh_interval,
    calls_per_step, batch, prompts, model, device, dtype, executor, seconds.
    """

    fingerprint: ModelFingerprint
    modules: list[str]
    layers: list[int]
    grid: Grid
    block_q: int
    block_k: int
    candidates: list[Candidate]
    error: np.ndarray
    density: np.ndarray
    columns: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] | None = None
    step_error: dict[int, np.ndarray] = field(default_factory=dict)  # sampled step -> its (M, H, C) error

    def __post_init__(self):
        shape = (len(self.modules), self.fingerprint.num_heads, len(self.candidates))
        for name in ("error", "density"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise StatsError(f"{name} has shape {arr.shape}, expected (modules, heads, candidates) = {shape}")
            setattr(self, name, arr)
        for step, arr in list(self.step_error.items()):
            arr = np.asarray(arr, dtype=np.float64)
            if arr.shape != shape:
                raise StatsError(f"step_error of step {step} has shape {arr.shape}, expected {shape}")
            self.step_error[int(step)] = arr

    def has_step_weights(self) -> bool:
        """Whether the sampled steps can be weighted: per-step errors and measured step sensitivities."""
        return bool(self.step_error) and bool(self.info.get("step_sensitivity"))

    def error_over_steps(self, weights: dict[int, float] | None) -> np.ndarray:
        """(M, H, C) error with the sampled steps weighted (None: `error`, the plain mean over the steps)."""
        if weights is None:
            return self.error
        missing = sorted(set(weights) - set(self.step_error))
        if missing:
            raise StatsError(f"these statistics have no per-step errors for steps {missing}; calibrate again "
                             "with this dit-sparse to weight steps")
        total = sum(weights.values())
        return sum(w * self.step_error[step] for step, w in weights.items()) / total

    def spec(self, module: int, head: int, cand: int) -> HeadStrategy:
        c = self.candidates[cand]
        if c.per_head:
            return mass_spec(self.columns[(module, head, cand)])
        return c.spec

    def check_model(self, fingerprint: ModelFingerprint, source: str = "the model") -> None:
        mismatch = self.fingerprint.mismatch(fingerprint)
        if mismatch:
            # ModelFingerprint.mismatch words the first as "plan"; here it is the statistics file.
            raise StatsError(f"these statistics were captured on another model than {source} "
                             f"({mismatch.replace('plan has', 'stats have')}); calibrate again for this model")

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "model": {"transformer_class": self.fingerprint.transformer_class,
                      "num_layers": self.fingerprint.num_layers, "num_heads": self.fingerprint.num_heads,
                      "head_dim": self.fingerprint.head_dim},
            "modules": list(self.modules),
            "layers": list(self.layers),
            "grid": [self.grid.frames, self.grid.height, self.grid.width],
            "blocks": [self.block_q, self.block_k],
            "candidates": [c.to_json() for c in self.candidates],
            "error": _round(self.error),
            "density": _round(self.density),
            "columns": [[m, h, c, cols] for (m, h, c), cols in sorted(self.columns.items())],
            "info": self.info,
            "cost": self.cost,
            "step_error": [[step, _round(arr)] for step, arr in sorted(self.step_error.items())],
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        from dit_sparse.inputs import InputFileError, read_text_file

        path = Path(path)
        if not path.exists():
            raise StatsError(f"`stats`: no statistics file at {path}")
        try:  # a binary file, a device or a FIFO: one line naming it, not a UnicodeDecodeError or a hang
            data = json.loads(read_text_file(path, "`stats`", "a statistics file (.stats.json) of an earlier search"))
        except InputFileError as e:
            raise StatsError(str(e)) from None
        except json.JSONDecodeError as e:
            raise StatsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise StatsError(f"{path}: not a dit-sparse search statistics file (format {STATS_FORMAT!r} expected)")
        if data.get("version") != STATS_VERSION:
            raise StatsError(f"{path}: statistics version {data.get('version')!r}, this dit-sparse reads "
                             f"{STATS_VERSION}")
        try:
            return cls(
                fingerprint=ModelFingerprint(**data["model"]),
                modules=list(data["modules"]),
                layers=[int(x) for x in data["layers"]],
                grid=Grid(*data["grid"]),
                block_q=int(data["blocks"][0]),
                block_k=int(data["blocks"][1]),
                candidates=[Candidate.from_json(c) for c in data["candidates"]],
                error=np.asarray(data["error"], dtype=np.float64),
                density=np.asarray(data["density"], dtype=np.float64),
                columns={(m, h, c): list(cols) for m, h, c, cols in data.get("columns", [])},
                info=dict(data.get("info", {})),
                cost=data.get("cost"),
                step_error={int(step): np.asarray(arr, dtype=np.float64) for step, arr in data.get("step_error", [])},
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StatsError):
                raise StatsError(f"{path}: {e}") from None
            raise StatsError(f"{path}: malformed statistics ({type(e).__name__}: {e})") from None


def _round(arr: np.ndarray) -> list:
    """Nested lists with 6 significant digits (plenty for errors and densities, and a short file)."""
    return np.vectorize(lambda x: float(f"{x:.6g}"))(arr).tolist() if arr.size else arr.tolist()
