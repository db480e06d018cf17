"""The plan of the demo page: a shipped plan that fits the model, an uploaded plan file, or one strategy for every
head with a density knob. Anything unusable is a DemoError with a message for the page."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..plan import PlanError, SparsePlan
from ..plan_spec import PLANS_DIR
from ..strategies import STRATEGIES
from .inputs import DemoError, as_number

logger = logging.getLogger(__name__)

SHIPPED, UPLOAD, UNIFORM = "shipped plan", "upload a plan", "uniform strategy"
PLAN_SOURCES = (SHIPPED, UPLOAD, UNIFORM)
MAX_PLAN_BYTES = 5 * 2**20
DEFAULT_KNOB = 0.25
DEFAULT_STRATEGY = "diagonal"
PYRAMID_BANDS = (0.6, 0.8, 0.9, 0.95)  # the bands the knob scales


@dataclass(frozen=True)
class Knob:
    """What the uniform-strategy slider ("knob" k, in (0, 1]; smaller is sparser) sets for one strategy."""

    effect: str  # in words, for the page
    params: Callable[[float], dict[str, Any]]  # k -> the strategy's parameters


KNOBS: dict[str, Knob] = {
    "diagonal": Knob("window = (k, k, k): half-widths in frames, rows and columns as fractions of the grid",
                     lambda k: {"window": [k, k, k]}),
    "multi_diagonal": Knob("window = (k, k): half-widths in rows and columns in every frame, as fractions of the grid",
                           lambda k: {"window": [k, k]}),
    "block_adaptive": Knob("cap = k: at most this fraction of key blocks chosen by estimated mass (tau 0.9)",
                           lambda k: {"cap": k}),
    "pyramid": Knob("bands scaled by k: less attention mass kept at full resolution, more pooled or dropped",
                    lambda k: {"bands": [round(b * k, 6) for b in PYRAMID_BANDS]}),
}


def knob_params(strategy: str, knob: float) -> dict[str, Any]:
    """The parameters the density knob gives `strategy` (none for strategies without a density knob)."""
    return KNOBS[strategy].params(float(knob)) if strategy in KNOBS else {}


def knob_effect(strategy: str | None) -> str:
    if strategy in KNOBS:
        return f"Density knob k: {KNOBS[strategy].effect}."
    return f"The density knob does not apply to {strategy!r}; it runs with its default parameters."


class PlanChoice:
    """The plans one transformer can run: the shipped ones that fit it (the --plan file first), and the initial
    plan source and strategy of the page."""

    def __init__(self, transformer, plan: str | None = None):
        self.transformer = transformer
        self.shipped: dict[str, Path] = {}
        self.default_source, self.default_strategy = SHIPPED, DEFAULT_STRATEGY
        if plan is not None and plan in STRATEGIES:
            self.default_source, self.default_strategy = UNIFORM, plan
        elif plan is not None and plan != "default":
            self.shipped[Path(plan).name] = self._given(plan)
        for path in sorted(PLANS_DIR.glob("*.plan.json")):
            try:
                if self._compatible(SparsePlan.load(path)) and path.name not in self.shipped:
                    self.shipped[path.name] = path
            except PlanError as e:
                logger.warning("skipping shipped plan %s: %s", path, e)
        if self.default_source == SHIPPED and not self.shipped:
            self.default_source = UNIFORM

    def _given(self, plan: str) -> Path:
        path = Path(plan)
        if not path.exists():  # the same words as generate's --plan
            raise DemoError(f"--plan: {plan!r} is neither a plan file nor a strategy (known strategies: "
                            f"{', '.join(sorted(STRATEGIES))}; or 'default')")
        try:
            loaded = SparsePlan.load(path)
        except PlanError as e:
            raise DemoError(f"--plan: {e}") from None
        self.check_fits(loaded, f"--plan {path.name}")
        return path

    def _compatible(self, plan: SparsePlan) -> bool:
        from ..adapters import adapter_for_transformer

        return plan.model.mismatch(adapter_for_transformer(self.transformer).fingerprint(self.transformer)) is None

    def check_fits(self, plan: SparsePlan, what: str) -> None:
        from ..processor import PlanMismatchError, SparseProcessor

        try:
            SparseProcessor(plan).check_plan(self.transformer)
        except PlanMismatchError as e:
            raise DemoError(f"{what}: {e}") from None

    def resolve(self, source: str | None, shipped: str | None = None, upload: str | None = None,
                strategy: str | None = None, knob: float | None = DEFAULT_KNOB) -> tuple[SparsePlan, str]:
        """(plan, a short name for it) from the page's plan inputs; DemoError on anything unusable."""
        make = _SOURCES.get(source) if isinstance(source, str) else None
        if make is None:
            raise DemoError(f"plan source must be one of {', '.join(PLAN_SOURCES)}, got {source!r}")
        return make(self, shipped=shipped, upload=upload, strategy=strategy, knob=knob)

    def _shipped(self, shipped: str | None, **_) -> tuple[SparsePlan, str]:
        if not self.shipped:
            raise DemoError("no shipped plan fits this model; upload a plan or choose a uniform strategy")
        if shipped not in self.shipped:
            raise DemoError(f"unknown shipped plan {shipped!r}; choose one of {', '.join(self.shipped)}")
        try:
            return SparsePlan.load(self.shipped[shipped]), shipped
        except PlanError as e:
            raise DemoError(f"shipped plan {shipped}: {e}") from None

    def _uploaded(self, upload: str | None, **_) -> tuple[SparsePlan, str]:
        if not upload:
            raise DemoError("no plan file uploaded: upload a .plan.json file, or pick another plan source")
        path = Path(upload)
        name = path.name
        try:
            if path.stat().st_size > MAX_PLAN_BYTES:
                raise DemoError(f"the uploaded plan {name} is larger than {MAX_PLAN_BYTES // 2**20} MiB")
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise DemoError(f"could not read the uploaded plan {name}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise DemoError(f"the uploaded plan {name} is not a text (UTF-8 JSON) file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DemoError(f"the uploaded plan {name} is not valid JSON ({e.msg} at line {e.lineno}, "
                            f"column {e.colno})") from None
        try:
            plan = SparsePlan.from_json(data, source=name)
        except PlanError as e:
            raise DemoError(f"the uploaded plan is broken: {e}") from None
        self.check_fits(plan, f"the uploaded plan {name}")
        return plan, name

    def _uniform(self, strategy: str | None, knob: float | None, **_) -> tuple[SparsePlan, str]:
        if strategy not in STRATEGIES:
            raise DemoError(f"unknown strategy {strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}")
        params = {}
        if strategy in KNOBS:
            k = as_number(knob, "the density knob")
            if not 0.0 < k <= 1.0:
                raise DemoError(f"the density knob must be in (0, 1], got {knob!r}")
            params = knob_params(strategy, k)
        try:
            plan = SparsePlan.uniform(self.transformer, strategy, **params)
        except PlanError as e:
            raise DemoError(f"uniform {strategy}: {e}") from None
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        return plan, f"uniform {strategy}" + (f" ({shown})" if shown else "")


# the page's plan source -> how a plan is made from it
_SOURCES: dict[str, Callable[..., tuple[SparsePlan, str]]] = {
    SHIPPED: PlanChoice._shipped, UPLOAD: PlanChoice._uploaded, UNIFORM: PlanChoice._uniform,
}
