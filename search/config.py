"""The settings of a search, typed and checked once, when the configuration is made.

    from dit_sparse.search import SearchConfig, search
    result = search("tiny-shapes", SearchConfig(target_speedup=2.0, out="tiny.plan.json"))

`SearchConfig` is every setting of the per-head search (`search`), `ScheduleSearchConfig` every setting of the
reuse-schedule search (`search_reuse_schedule`); both extend `RunSettings`, what the two share: the generations
they run (prompts, size, steps, guidance, seed), where the files go and the machine. A bad value raises SearchError
naming the field in backquotes (the command line words it as its flag).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dit_sparse.checks import ArgumentError, check_sizes
from dit_sparse.models import check_device_and_dtype

from .errors import SearchError
from .problem import STEP_WEIGHTS
from .schedule import ScheduleGrid
from .solver import Budget

COSTS = ("measured", "flop")
LAYER_WEIGHTS = ("sensitivity", "none")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What both searches share. prompts: a list of prompts, a text file with one per line, or None for the
    model's calibration prompts (see `pipeline.calibration_prompts`); height, width, frames, steps, guidance:
    None for the pipeline's defaults; min_psnr: the mean PSNR against dense (dB) the end-to-end check asks of a
    plan; allow_closest: write the closest plan when none meets the budget; threads: torch CPU threads (None:
    the cores not already busy); progress: tqdm bars on stderr."""

    prompts: Sequence[str] | str | Path | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    min_psnr: float | None = None
    allow_closest: bool = False
    out: str | Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        try:
            check_device_and_dtype(self.device, self.dtype)
            check_sizes(self.height, self.width, self.frames)
        except ArgumentError as e:
            raise SearchError(str(e)) from None
        if self.prompts is not None and not isinstance(self.prompts, (str, Path)):
            if not [p for p in self.prompts if p.strip()]:
                raise SearchError("no prompt given (the prompt list is empty)")
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.threads is not None and self.threads < 1:
            raise SearchError(f"`threads` must be >= 1, got {self.threads}")


@dataclass(frozen=True, kw_only=True)
class SearchConfig(RunSettings):
    """Every setting of `search(model, config)`.

    Budget: `max_error` is the relative L2 error of attention outputs (0.1 when no target is given);
    `target_speedup` the predicted attention speedup over a whole generation; `target_density` the mean fraction
    of attention work of the covered heads during sparse steps. `min_psnr` (with an error budget): generate the
    calibration prompts dense and with candidate plans and keep the fastest plan whose mean PSNR against dense
    reaches it, tightening the error budget and lengthening the dense warm-up as needed. `pick_by_psnr` (with a
    speed or density target): solve the target under several error models, generate the calibration prompts with
    each plan and keep the highest mean PSNR against dense.

    Plan: `dense_first` is the fraction of the first steps that stay dense, `dense_layers` the layers that do.

    Calibration: `stats` re-solves from the statistics file of an earlier search instead of calibrating; `cost`
    "measured" times the candidates on this machine (cached in `cache_dir`), "flop" counts their work;
    `calib_steps` denoising steps are sampled; `refresh_interval` is the steps between refreshes of dynamic
    layouts and re-scale statistics (5; with `stats`, it must match them). `layer_weights` "sensitivity" weights
    each layer's error by its measured effect on the transformer output, "none" not; `step_weights` "none"
    averages the sampled steps alike, "sensitivity" weights each by the measured effect of a perturbation at that
    step on the generated result.
    """

    # In this order the command line lists the flags that `--reuse-schedule` refuses.
    max_error: float | None = None
    target_density: float | None = None
    target_speedup: float | None = None
    pick_by_psnr: bool = False
    dense_first: float = 0.2
    dense_layers: tuple[int, ...] = ()
    stats: str | Path | None = None
    cost: str = "measured"
    cache_dir: str | Path | None = None
    calib_steps: int = 5
    refresh_interval: int | None = None
    layer_weights: str = "sensitivity"
    step_weights: str = "none"

    def __post_init__(self):
        self.budget.validate()
        if not 0.0 <= self.dense_first < 1.0:
            raise SearchError(f"`dense_first` must be a fraction of steps in [0, 1), got {self.dense_first}")
        targets = self.target_speedup is not None or self.target_density is not None
        if self.min_psnr is not None:
            if not self.min_psnr > 0:
                raise SearchError(f"`min_psnr` must be a PSNR in dB > 0, got {self.min_psnr}")
            if targets:
                raise SearchError("`min_psnr` tightens the error budget; use it with `max_error` (or no budget), not "
                                  "with `target_speedup` / `target_density` (there, `pick_by_psnr` keeps the most "
                                  "faithful plan end to end)")
        if self.pick_by_psnr and not targets:
            raise SearchError("`pick_by_psnr` chooses among plans that meet a speed or density target; give "
                              "`target_speedup` or `target_density` (with an error budget, use `min_psnr`)")
        if self.step_weights not in STEP_WEIGHTS:
            raise SearchError(f"`step_weights` must be one of {', '.join(STEP_WEIGHTS)}, got {self.step_weights!r}")
        if self.layer_weights not in LAYER_WEIGHTS:
            raise SearchError(f"`layer_weights` must be one of {', '.join(LAYER_WEIGHTS)}, got "
                              f"{self.layer_weights!r}")
        if self.cost not in COSTS:
            raise SearchError(f"`cost` must be 'measured' or 'flop', got {self.cost!r}")
        super().__post_init__()  # after the budget's checks, before the refresh interval's: the order errors had
        if self.refresh_interval is not None and self.refresh_interval < 1:
            raise SearchError(f"`refresh_interval` must be >= 1 step, got {self.refresh_interval}")
        object.__setattr__(self, "dense_layers", tuple(int(layer) for layer in self.dense_layers))

    @property
    def budget(self) -> Budget:
        return Budget(self.max_error, self.target_speedup, self.target_density)


@dataclass(frozen=True, kw_only=True)
class ScheduleSearchConfig(RunSettings):
    """Every setting of `search_reuse_schedule(model, config)`: `min_psnr` is required (the bar the fastest
    schedule must reach), `grid` narrows or widens the candidate schedules (None: the defaults for the step
    count, see `ScheduleGrid.for_steps`)."""

    grid: ScheduleGrid | None = None

    def __post_init__(self):
        if self.min_psnr is None or not self.min_psnr > 0:
            raise SearchError("`reuse_schedule` keeps the fastest schedule that reaches `min_psnr`; give `min_psnr` "
                              f"DB (a PSNR in dB > 0){'' if self.min_psnr is None else f', got {self.min_psnr}'}")
        super().__post_init__()
