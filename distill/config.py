"""DistillConfig: every knob of a distillation run, from defaults, a YAML file and command-line overrides.

Precedence: dataclass defaults < YAML file (``--config``) < explicit command-line flags < ``--set key=value``.
A run writes its resolved configuration to ``OUT/config.yaml``; ``--resume OUT`` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# yaml (pyyaml, the distill extra) is imported where used: `dit-sparse` registers the distill command, and so
# imports this module, also where the extra is not installed.


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class DistillConfig:
    # -- what is distilled --------------------------------------------------------------------------------------
    teacher: str = "tiny-shapes"  # tiny-shapes, or a local diffusers pipeline directory / hub id
    plan: str = "default"  # default, a plan file, or a uniform strategy "diagonal:window=[1,0.25,0.25]"
    executor: str | None = None  # attention executor of the student (None: the best for the device)
    block_size: list[int] | None = None  # (block_q, block_k) override for the executor
    student_steps: int = 4  # K
    shift: float | None = None  # static shift of the student's grid (None: the teacher scheduler's)
    terminal_sigma: float | None = None  # last non-zero level (None: 1/K, evenly spaced at shift 1)
    eta: float = 1.0  # rollout noise: 1 = deterministic Euler (exported as is), 0 = fresh noise each step
    guidance: float = 4.5  # CFG of the teacher's score
    negative_prompt: str = ""
    prompts: str | None = None  # text file, one prompt per line (tiny-shapes: its training captions)
    height: int | None = None  # video size (None: the pipeline's default)
    width: int | None = None
    frames: int | None = None
    # -- optimisation -------------------------------------------------------------------------------------------
    max_steps: int = 300  # student updates
    max_minutes: float | None = None  # stop earlier after this wall time (checkpoint, validate, export; resumable)
    batch_size: int = 2  # per process and micro-batch
    grad_accum: int = 1
    fake_updates: int = 5  # fake-score updates per student update (DMD2/TDM: several)
    lr: float = 1e-5  # student
    fake_lr: float = 5e-5  # fake score (TDM: five times the student's)
    betas: list[float] = field(default_factory=lambda: [0.0, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    huber_c: float | None = None  # pseudo-Huber constant (None: 0.00054 sqrt(dimension of a sample))
    min_sigma: float = 1e-3  # smallest t drawn in the last interval
    ema_decay: float = 0.99  # 0 disables the EMA
    lora_rank: int = 0  # > 0: the student is LoRA adapters on the teacher (peft), the teacher = adapters disabled
    lora_alpha: float | None = None  # None: the rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0",
                                                              "ffn.net.0.proj", "ffn.net.2"])
    mixed_precision: str = "no"  # no, bf16, fp16
    gradient_checkpointing: bool = False
    cpu: bool = False  # force CPU even where CUDA exists
    threads: int | None = None  # torch CPU threads
    seed: int = 0
    # -- bookkeeping --------------------------------------------------------------------------------------------
    out: str = "runs/distill"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    validation: bool = True  # reference teacher videos at the start, student videos at the end
    validate_every: int = 0  # also every N steps (0: only after the last step)
    validation_prompts: list[str] | None = None  # None: 4 held-out prompts (tiny-shapes) or the first prompts
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    teacher_steps: int = 50  # the dense teacher's steps for the reference validation videos
    log_every: int = 1
    export: bool = True
    export_ema: bool = True

    def validate(self) -> "DistillConfig":
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"{key}: {msg}, got {getattr(self, key)!r}")

        need(self.student_steps >= 1, "student_steps", "must be >= 1")
        need(self.max_steps >= 0, "max_steps", "must be >= 0")
        need(self.max_minutes is None or self.max_minutes >= 0, "max_minutes", "must be >= 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.fake_updates >= 0, "fake_updates", "must be >= 0")
        need(self.lr >= 0 and self.fake_lr >= 0, "lr", "learning rates must be >= 0")
        need(self.eta in (0.0, 1.0), "eta",
             "must be 1 (deterministic Euler) or 0 (stochastic sampling): only these have an exact diffusers sampler")
        need(self.terminal_sigma is None or 0.0 < self.terminal_sigma < 1.0, "terminal_sigma", "must be in (0, 1)")
        need(self.shift is None or self.shift > 0, "shift", "must be > 0")
        need(self.guidance >= 0, "guidance", "must be >= 0")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.lora_rank >= 0, "lora_rank", "must be >= 0")
        need(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "must be no, bf16 or fp16")
        need(len(self.betas) == 2, "betas", "must be two numbers")
        need(self.block_size is None or len(self.block_size) == 2, "block_size", "must be [block_q, block_k]")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.min_sigma >= 0, "min_sigma", "must be >= 0")
        need(self.validate_every >= 0, "validate_every", "must be >= 0")
        return self

    # -- files --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        import yaml

        from dit_sparse.atomic import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DistillConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        cfg = cls()
        for key, value in data.items():
            setattr(cfg, key, _coerce(known[key], value, source))
        return cfg.validate()

    @classmethod
    def load(cls, path: str | Path) -> "DistillConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()}, str(path))

    def updated(self, **changes) -> "DistillConfig":
        known = {f.name: f for f in fields(self)}
        out = dataclasses.replace(self)
        for key, value in changes.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"--set {key}: unknown key (known: {', '.join(sorted(known))})")
            setattr(out, key, _coerce(known[key], value, "--set"))
        return out.validate()


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """['lr=1e-4', 'betas=[0, 0.99]'] -> {'lr': 1e-4, 'betas': [0, 0.99]} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key.strip()] = _parse_yaml(value, f"--set {item!r}")
    return out


def _parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, with a syntax error turned into one ConfigError line that names the source and position."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _coerce(f: dataclasses.Field, value: Any, source: str):
    """Light type checking so a YAML typo fails here and not 300 steps later."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{source}: {f.name} cannot be null")
    try:
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError
            return bool(value)
        if kind.startswith("list[float]"):
            return [float(v) for v in value]
        if kind.startswith("list[int]"):
            return [int(v) for v in value]
        if kind.startswith("list[str]"):
            return [str(v) for v in value]
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name} expects {kind}, got {value!r}") from None
    return value
