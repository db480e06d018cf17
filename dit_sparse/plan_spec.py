"""Plans named on the command line: 'default' (the plan shipped for a pipeline), a plan file, or a uniform strategy
with optional parameters ('block_adaptive:tau=0.8,cap=0.3')."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .checks import ArgumentError
from .plan import SparsePlan
from .strategies import STRATEGIES

PLANS_DIR = Path(__file__).resolve().parent / "plans"


DEFAULT_PLANS = {"TinyShapesPipeline": PLANS_DIR / "tiny-shapes.plan.json"}


def equivalent_default_plan_id(pipeline_class: str, steps: int | None) -> str | None:
    """The id of the file the shipped default plan was converted from, when a run at `steps` (None: the pipeline's
    default) computes exactly what that earlier file computed: its dense steps moved from step counts to noise
    levels, the same steps at the step count it was measured at (`in_noise_units`)."""
    path = DEFAULT_PLANS.get(pipeline_class)
    if path is None or not path.is_file():
        return None
    converted = json.loads(path.read_text()).get("calibration", {}).get("schedule_in_noise_units")
    if not converted or steps not in (None, converted.get("steps")):
        return None
    return converted.get("from_plan_id")


def default_plan_id(pipeline_class: str) -> str | None:
    """Short content hash of the default plan shipped for a pipeline class (None when none ships).

    Results that ran `default` record it, so that the README can tell when the default plan has changed since."""
    path = DEFAULT_PLANS.get(pipeline_class)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path is not None and path.is_file() else None


def resolve_plan(spec: str | None, pipe, transformer, option: str = "--plan") -> SparsePlan:
    """A plan file, a uniform strategy name, or the shipped default plan of the pipeline's kind (`option`: the
    command-line option that gave `spec`, for errors)."""
    kind = type(pipe).__name__
    if spec is None or spec == "default":
        if kind not in DEFAULT_PLANS:
            raise ArgumentError(f"no default plan ships for {kind}; pass --plan FILE or a strategy name "
                                f"({', '.join(sorted(STRATEGIES))})")
        return SparsePlan.load(DEFAULT_PLANS[kind])
    if spec in STRATEGIES:
        return SparsePlan.uniform(transformer, spec)
    if not Path(spec).exists():
        raise ArgumentError(f"{option}: {spec!r} is neither a plan file nor a strategy "
                            f"(known strategies: {', '.join(sorted(STRATEGIES))})")
    return SparsePlan.load(spec)


@dataclass
class PlanRun:
    label: str
    plan: SparsePlan | None  # None: dense
    speed_only: bool = False  # the ceiling run: its frames say nothing, so fidelity is not reported


def parse_plan_spec(spec: str, pipe, transformer) -> PlanRun:
    """'default', a plan file, or a uniform strategy with optional parameters: 'block_adaptive:tau=0.8,cap=0.3'."""
    name, _, params_text = spec.partition(":")
    if name in STRATEGIES:
        params = {}
        for item in filter(None, split_top_level(params_text)):
            key, _, value = item.partition("=")
            try:
                params[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                raise ArgumentError(f"--plans {spec!r}: {value!r} is not a JSON value (lists go in brackets: "
                                    "'diagonal:window=[1,0.25,0.25]')") from None
        return PlanRun(spec, SparsePlan.uniform(transformer, name, **params))
    return PlanRun(spec, resolve_plan(spec, pipe, transformer, option="--plans"))


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets: 'window=[1,2,2],fp8=true' -> ['window=[1,2,2]', 'fp8=true']."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]
