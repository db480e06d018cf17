"""SparsePlan: which strategy runs in every (attention module, head), saved as versioned, validated JSON.

JSON layout (version 1)::

    {
      "format": "dit-sparse-plan", "version": 1,
      "model": {"transformer_class": "WanTransformer3DModel", "num_layers": 30, "num_heads": 12, "head_dim": 128},
      "calibration": {...free-form metadata...},
      "default": {"strategy": "dense"},
      "schedule": {"dense_first": 0.2, "dense_last_steps": 0, "dense_layers": [0], "refresh_interval": 5},
      "modules": {
        "blocks.3.attn1": {"strategy": "diagonal", "window": [1, 0.25, 0.25]},
        "blocks.4.attn1": [{"strategy": "skip"}, {"strategy": "block_adaptive", "tau": 0.9, "rescale": true}, ...]
      }
    }

A module entry is one strategy for every head or a list with one strategy per head. Strategy parameters sit beside
"strategy"; the modifiers "rescale" and "fp8" are booleans. Missing parameters take the strategy's defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .strategies import MODIFIERS, STRATEGIES

PLAN_FORMAT = "dit-sparse-plan"
PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)


class PlanError(ValueError):
    """A plan that cannot be used; the message names the JSON path of the problem."""


# The largest plan file read: a 100-layer x 64-head plan with every head spelled out is about 1 MB.
MAX_PLAN_BYTES = 64 * 2**20


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a key given twice (json would silently keep the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"duplicate key {key!r}: each key may appear once in an object (the second would "
                            "silently replace the first)")
        out[key] = value
    return out


def parse_json_text(text: str, source: str) -> Any:
    """JSON text to Python, with PlanError naming `source` for anything that is not a plain JSON document: a
    syntax error, a duplicate key, a number too long to convert, nesting too deep to read."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise PlanError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except PlanError as e:
        raise PlanError(f"{source}: {e}") from None
    except RecursionError:
        raise PlanError(f"{source}: JSON nested too deeply to be a plan") from None
    except ValueError as e:  # Python refuses integers of more than 4300 digits
        raise PlanError(f"{source}: not a usable JSON document ({e})") from None


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value):
    return list(_thaw(v) for v in value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class HeadStrategy:
    """One head's strategy: a registered name, its full parameters, and the two modifiers."""

    strategy: str
    params: tuple[tuple[str, Any], ...] = ()
    rescale: bool = False
    fp8: bool = False

    @classmethod
    def make(cls, strategy: str, path: str = "$", **given) -> "HeadStrategy":
        """Validate and fill defaults; raises PlanError naming `path` on a bad name or parameter."""
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise PlanError(f"{path}.strategy: unknown strategy {strategy!r}; known: {', '.join(sorted(STRATEGIES))}")
        impl = STRATEGIES[strategy]
        modifiers = {m: given.pop(m, False) for m in MODIFIERS}
        for name, value in modifiers.items():
            if not isinstance(value, bool):
                raise PlanError(f"{path}.{name}: must be true or false, got {value!r}")
        if modifiers["rescale"] and (not impl.computes or impl.dense):
            raise PlanError(f"{path}.rescale: only sparse strategies can be re-scaled, not {strategy!r}")
        if modifiers["fp8"] and impl.reuses:
            raise PlanError(f"{path}.fp8: `reuse` refreshes with 16-bit dense attention; drop fp8 there")
        unknown = sorted(set(given) - set(impl.params))
        if unknown:
            allowed = ", ".join(sorted(impl.params)) or "none"
            raise PlanError(f"{path}.{unknown[0]}: unknown parameter for {strategy!r} "
                            f"(allowed: {allowed}, rescale, fp8)")
        params = {}
        for name, spec in impl.params.items():
            value = given.get(name, spec.default)
            error = spec.check(value)
            if error:
                raise PlanError(f"{path}.{name}: {error}")
            params[name] = _freeze(value)
        return cls(strategy, tuple(sorted(params.items())), modifiers["rescale"], modifiers["fp8"])

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def impl(self):
        """The registered Strategy: what it needs and does (dense, dynamic, pooled, computes, reuses)."""
        return STRATEGIES[self.strategy]

    @property
    def runs_dense(self) -> bool:
        """Whether the best dense kernel runs it: every query attends every key in 16 bits, with no layout and no
        LSE (text keys included in the same call, nothing to merge)."""
        return self.impl.dense and not self.fp8

    @property
    def keeps_state(self) -> bool:
        """Whether it carries state from one denoising step to the next: kept outputs (`reuse`), re-scale
        statistics, or a dynamic layout refreshed every `refresh_interval` steps."""
        return self.rescale or self.impl.reuses or self.impl.dynamic

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy}
        out.update({k: _thaw(v) for k, v in self.params})
        if self.rescale:
            out["rescale"] = True
        if self.fp8:
            out["fp8"] = True
        return out

    @classmethod
    def from_json(cls, data: Any, path: str) -> "HeadStrategy":
        if isinstance(data, str):
            return cls.make(data, path)
        if not isinstance(data, Mapping) or "strategy" not in data:
            raise PlanError(f"{path}: expected an object with a \"strategy\" key, got {data!r}")
        given = dict(data)
        return cls.make(given.pop("strategy"), path, **given)

    def describe(self) -> str:
        extras = [f"{k}={_thaw(v)}" for k, v in self.params]
        extras += [m for m in MODIFIERS if getattr(self, m)]
        return self.strategy + (f"({', '.join(extras)})" if extras else "")


DENSE = HeadStrategy("dense")


@dataclass(frozen=True)
class ModelFingerprint:
    transformer_class: str
    num_layers: int
    num_heads: int
    head_dim: int

    def mismatch(self, other: "ModelFingerprint") -> str | None:
        fields = ("transformer_class", "num_layers", "num_heads", "head_dim")
        diffs = [f"{f}: plan has {getattr(self, f)!r}, model has {getattr(other, f)!r}" for f in fields
                 if getattr(self, f) != getattr(other, f)]
        return "; ".join(diffs) or None


@dataclass(frozen=True)
class Schedule:
    """When the plan applies: which denoising steps and layers run dense, and how often refreshes happen.

    Dense steps are given in one of two units:

    - noise level (version 2, what the search writes): a step runs dense when its noise level is at least
      `dense_above` or at most `dense_below` (1 is pure noise, 0 a clean sample). Every form of applying a plan sees
      the timestep the pipeline passes to the transformer, and each model adapter turns it into a noise level, so a
      plan in these units runs the same steps dense in `apply(pipe)`, `apply(transformer)` and the one-line form.
      `calibrated_noise` records the noise levels of the step grid the plan was measured on (for the summary).
    - steps (version 1 files, `with_schedule(dense_first=..., dense_last_steps=...)`): `dense_first` is the fraction
      of the steps that run dense at the start (rounded), `dense_last_steps` a number of steps at the end. These need
      the step count, which only the pipeline knows: `apply(pipe)` reads it from the scheduler, pipelines that pass
      it in their cache context (Wan, tiny-shapes) give it to every form, and elsewhere the processor refuses to run
      rather than guess. `in_noise_units(noise_levels)` turns such a schedule into noise levels for one step grid.
    """

    dense_first: float = 0.0
    dense_last_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    refresh_interval: int = 5
    dense_above: float | None = None
    dense_below: float | None = None
    calibrated_noise: tuple[float, ...] = ()

    KEYS = ("dense_first", "dense_last_steps", "dense_layers", "refresh_interval", "dense_above", "dense_below",
            "calibrated_noise")

    @classmethod
    def from_json(cls, data: Any, path: str = "$.schedule", version: int = PLAN_VERSION) -> "Schedule":
        if not isinstance(data, Mapping):
            raise PlanError(f"{path}: expected an object, got {data!r}")
        allowed = cls.KEYS if version >= 2 else cls.KEYS[:4]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise PlanError(f"{path}.{unknown[0]}: unknown key in a version {version} plan "
                            f"(allowed: {', '.join(allowed)})")
        values = dict(data)
        for key in ("dense_layers", "calibrated_noise"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        out = cls(**values)
        out.validate(path)
        return out

    def validate(self, path: str = "$.schedule") -> None:
        if not _is_number(self.dense_first) or not 0.0 <= self.dense_first <= 1.0:
            raise PlanError(f"{path}.dense_first: must be a fraction of steps in [0, 1], got {self.dense_first!r}")
        if not _is_int(self.dense_last_steps) or self.dense_last_steps < 0:
            raise PlanError(f"{path}.dense_last_steps: must be an integer >= 0, got {self.dense_last_steps!r}")
        if not isinstance(self.dense_layers, tuple) or not all(_is_int(i) and i >= 0 for i in self.dense_layers):
            raise PlanError(f"{path}.dense_layers: must be a list of layer indices >= 0, got {self.dense_layers!r}")
        if not _is_int(self.refresh_interval) or self.refresh_interval < 1:
            raise PlanError(f"{path}.refresh_interval: must be an integer >= 1, got {self.refresh_interval!r}")
        for key in ("dense_above", "dense_below"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not 0.0 <= value <= 1.0):
                raise PlanError(f"{path}.{key}: must be a noise level in [0, 1] or null, got {value!r}")
        if not isinstance(self.calibrated_noise, tuple) or not all(
                _is_number(v) and 0.0 <= v <= 1.0 for v in self.calibrated_noise):
            raise PlanError(f"{path}.calibrated_noise: must be a list of noise levels in [0, 1], "
                            f"got {self.calibrated_noise!r}")
        if self.counts_steps and self.uses_noise_levels:
            raise PlanError(f"{path}: dense steps are given both in steps (dense_first, dense_last_steps) and in noise "
                            "levels (dense_above, dense_below); use one unit")

    @property
    def counts_steps(self) -> bool:
        """Whether dense steps are given in steps, which needs the pipeline's step count."""
        return self.dense_first > 0 or self.dense_last_steps > 0

    @property
    def uses_noise_levels(self) -> bool:
        return self.dense_above is not None or self.dense_below is not None

    def dense_at_noise(self, noise: float) -> bool:
        """Whether a step at this noise level runs dense (noise-level schedules)."""
        return (self.dense_above is not None and noise >= self.dense_above) or (
            self.dense_below is not None and noise <= self.dense_below)

    def dense_at_step(self, step: int, total: int) -> bool:
        """Whether step `step` (0-based) of `total` runs dense (step schedules; as measured by version 1)."""
        return step < int(round(self.dense_first * total)) or step >= total - self.dense_last_steps

    def in_noise_units(self, noise_levels) -> "Schedule":
        """This schedule in noise levels, running exactly the same steps dense on the step grid `noise_levels`
        (one per step, falling). Each threshold sits halfway between the last dense step and the next, so a timestep
        rounded on its way to the transformer (bf16) still lands on the same side."""
        levels = tuple(float(v) for v in noise_levels)
        if any(b >= a for a, b in zip(levels, levels[1:])):
            raise PlanError(f"noise levels must fall from step to step, got {levels}")
        total = len(levels)
        if not levels:
            raise PlanError("in_noise_units needs the noise level of every step, got none")
        if not self.counts_steps:
            return replace(self, calibrated_noise=levels)
        first = min(int(round(self.dense_first * total)), total)
        last_start = max(total - self.dense_last_steps, 0)
        above = None if first == 0 else (0.0 if first >= total else (levels[first - 1] + levels[first]) / 2)
        below = None if last_start >= total else (1.0 if last_start == 0 else
                                                  (levels[last_start - 1] + levels[last_start]) / 2)
        return replace(self, dense_first=0.0, dense_last_steps=0, dense_above=above, dense_below=below,
                       calibrated_noise=levels)

    def dense_steps_text(self) -> str:
        """Which steps run dense, in words (for summaries)."""
        if self.counts_steps:
            parts = []
            if self.dense_first > 0:
                parts.append(f"the first {self.dense_first:.0%} of the steps")
            if self.dense_last_steps > 0:
                parts.append(f"the last {self.dense_last_steps}")
            return " and ".join(parts) + " (counted in steps: needs the pipeline's step count)"
        if not self.uses_noise_levels:
            return "none"
        parts = []
        if self.dense_above is not None:
            parts.append(f"noise level >= {self.dense_above:.4g}")
        if self.dense_below is not None:
            parts.append(f"noise level <= {self.dense_below:.4g}")
        text = " or ".join(parts)
        if self.calibrated_noise:
            dense = [i for i, v in enumerate(self.calibrated_noise) if self.dense_at_noise(v)]
            text += (f"; on the {len(self.calibrated_noise)}-step grid it was measured on: "
                     f"{_ranges(dense) or 'none'}")
        return text

    def to_json(self) -> dict[str, Any]:
        out = {"dense_first": self.dense_first, "dense_last_steps": self.dense_last_steps,
               "dense_layers": list(self.dense_layers), "refresh_interval": self.refresh_interval}
        if self.uses_noise_levels or self.calibrated_noise:
            out.update(dense_above=self.dense_above, dense_below=self.dense_below,
                       calibrated_noise=list(self.calibrated_noise))
        return out


def _ranges(indices: list[int]) -> str:
    """'steps 0-3, 18, 19' style text for sorted step indices."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and i == groups[-1][-1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    spans = [f"{g[0]}-{g[-1]}" if len(g) > 2 else ", ".join(map(str, g)) for g in groups]
    return ("steps " + ", ".join(spans)) if spans else ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SparsePlan:
    """A per-module, per-head plan for one transformer architecture."""

    model: ModelFingerprint
    modules: Mapping[str, tuple[HeadStrategy, ...]] = field(default_factory=dict)
    default: HeadStrategy = DENSE
    schedule: Schedule = Schedule()
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, heads in self.modules.items():
            if len(heads) != self.model.num_heads:
                raise PlanError(
                    f"$.modules[{name!r}]: {len(heads)} head strategies for a model with {self.model.num_heads} heads"
                )
        self.schedule.validate()
        beyond = [layer for layer in self.schedule.dense_layers if layer >= self.model.num_layers]
        if beyond:
            raise PlanError(f"$.schedule.dense_layers: layer {beyond[0]} does not exist; the model has "
                            f"{self.model.num_layers} covered layers (0..{self.model.num_layers - 1})")

    # -- queries ---------------------------------------------------------------------------------------------
    def heads_for(self, module_name: str) -> tuple[HeadStrategy, ...]:
        """The strategy of every head of one attention module (the default where the plan says nothing)."""
        return self.modules.get(module_name) or (self.default,) * self.model.num_heads

    def spec_for(self, module_name: str, head: int) -> HeadStrategy:
        if not 0 <= head < self.model.num_heads:
            raise IndexError(f"head {head} does not exist: the model has {self.model.num_heads} heads "
                             f"(0..{self.model.num_heads - 1})")
        return self.heads_for(module_name)[head]

    @property
    def keeps_state_across_steps(self) -> bool:
        """Whether some head carries state from one denoising step to the next (`reuse`, re-scaled heads, dynamic
        layouts refreshed every `refresh_interval` steps): such a plan has to tell the steps apart."""
        heads = {self.default, *(h for spec in self.modules.values() for h in spec)}
        return any(h.keeps_state for h in heads)

    def strategy_for(self, module_name: str, head: int) -> str:
        """Name of the strategy that runs in this module and head."""
        return self.spec_for(module_name, head).strategy

    # -- builders ----------------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, transformer, strategy: str, *, schedule: Schedule | None = None, **params) -> "SparsePlan":
        """Every supported self-attention of `transformer` runs `strategy` with `params` on every head."""
        from .adapters import adapter_for_transformer

        adapter = adapter_for_transformer(transformer)
        fingerprint = adapter.fingerprint(transformer)
        spec = HeadStrategy.make(strategy, "$.default", **params)
        modules = {name: (spec,) * fingerprint.num_heads for name, _ in adapter.covered_modules(transformer)}
        return cls(fingerprint, modules, spec, schedule or Schedule())

    def with_module(self, module_name: str, spec: HeadStrategy | list[HeadStrategy]) -> "SparsePlan":
        """A copy with one module overridden (one strategy for every head, or one per head)."""
        heads = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,) * self.model.num_heads
        return replace(self, modules={**self.modules, module_name: heads})

    def with_schedule(self, **changes) -> "SparsePlan":
        return replace(self, schedule=replace(self.schedule, **changes))

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        modules = {}
        for name, heads in self.modules.items():
            modules[name] = heads[0].to_json() if len(set(heads)) == 1 else [h.to_json() for h in heads]
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"transformer_class": self.model.transformer_class, "num_layers": self.model.num_layers,
                      "num_heads": self.model.num_heads, "head_dim": self.model.head_dim},
            "calibration": dict(self.calibration),
            "default": self.default.to_json(),
            "schedule": self.schedule.to_json(),
            "modules": modules,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (a crash never leaves a half-written file)."""
        from .atomic import write_json

        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparsePlan":
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"SparsePlan.load takes a file path, got {type(path).__name__} (for a parsed JSON object "
                            "use SparsePlan.from_json)")
        from .inputs import InputFileError, read_text_file

        try:
            text = read_text_file(path, "plan file", "a plan file (.plan.json)", max_bytes=MAX_PLAN_BYTES)
        except InputFileError as e:
            raise PlanError(str(e)) from None
        return cls.from_json(parse_json_text(text, str(path)), source=str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "<plan>") -> "SparsePlan":
        try:
            return cls._parse(data)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    @classmethod
    def _parse(cls, data: Any) -> "SparsePlan":
        if not isinstance(data, Mapping):
            raise PlanError("$: a plan must be a JSON object")
        allowed = {"format", "version", "model", "calibration", "default", "schedule", "modules"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(f"$.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"$.format: expected {PLAN_FORMAT!r}, got {data.get('format')!r}")
        version = data.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise PlanError(f"$.version: this dit-sparse reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}, got {version!r}")
        model = cls._parse_model(data.get("model"))
        default = HeadStrategy.from_json(data.get("default", "dense"), "$.default")
        schedule = Schedule.from_json(data.get("schedule", {}), version=version)
        raw_modules = data.get("modules", {})
        if not isinstance(raw_modules, Mapping):
            raise PlanError("$.modules: expected an object keyed by module name")
        modules = {}
        for name, entry in raw_modules.items():
            path = f"$.modules[{name!r}]"
            if isinstance(entry, list):
                if len(entry) != model.num_heads:
                    raise PlanError(f"{path}: {len(entry)} head strategies, but the model has {model.num_heads} heads")
                modules[name] = tuple(HeadStrategy.from_json(h, f"{path}[{i}]") for i, h in enumerate(entry))
            else:
                modules[name] = (HeadStrategy.from_json(entry, path),) * model.num_heads
        calibration = data.get("calibration", {})
        if not isinstance(calibration, Mapping):
            raise PlanError("$.calibration: expected an object")
        return cls(model, modules, default, schedule, dict(calibration))

    @staticmethod
    def _parse_model(data: Any) -> ModelFingerprint:
        if not isinstance(data, Mapping):
            raise PlanError("$.model: expected an object with transformer_class, num_layers, num_heads, head_dim")
        expected = {"transformer_class": str, "num_layers": int, "num_heads": int, "head_dim": int}
        unknown = sorted(set(data) - set(expected))
        if unknown:
            raise PlanError(f"$.model.{unknown[0]}: unknown key (allowed: {', '.join(expected)})")
        for key, kind in expected.items():
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
                raise PlanError(f"$.model.{key}: expected {'a positive integer' if kind is int else 'a string'}, "
                                f"got {value!r}")
        return ModelFingerprint(**{k: data[k] for k in expected})
