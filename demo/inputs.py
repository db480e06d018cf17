"""The checks on every input of the demo page, and the request they make: a bad input is a DemoError whose message
is shown on the page as it is, naming the first bad input."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1


class DemoError(ValueError):
    """Bad input, or a model or plan that cannot be used: the message is shown on the page as it is."""


@dataclass(frozen=True)
class Request:
    """Everything that decides a result: the cache key."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    frames: int
    plan_json: str  # the plan, canonical JSON (an uploaded plan is keyed by its content, not its file name)


def as_number(value, name: str, whole: bool = False) -> float | int:
    """`value` (a number or its text, as a page field gives it) as a finite float, or an int when `whole`."""
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or value is None:
        raise DemoError(f"{name} must be {kind}, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be {kind}, got {value!r}") from None
    if whole and (not math.isfinite(f) or f != int(f)):
        raise DemoError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(f):
        raise DemoError(f"{name} must be a finite number, got {value!r}")
    return int(f) if whole else f


def parse_resolution(text, limits) -> tuple[int, int]:
    """"HEIGHTxWIDTH" (also "H × W") as (height, width), within `limits` (a model.Limits)."""
    parts = str(text or "").lower().replace("×", "x").replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DemoError(f"resolution must be HEIGHTxWIDTH, e.g. {limits.default_resolution}; got {text!r}")
    h, w = int(parts[0]), int(parts[1])
    if h % limits.multiple or w % limits.multiple:
        raise DemoError(f"this model cannot take {h}x{w}: height and width must be multiples of {limits.multiple}")
    if min(h, w) < limits.min_side or max(h, w) > limits.max_side:
        raise DemoError(f"resolution {h}x{w} is outside what this demo allows: each side from "
                        f"{limits.min_side} to {limits.max_side} pixels")
    return h, w


def check_frames(frames, limits) -> int:
    n = as_number(frames, "frames", whole=True)
    if not 1 <= n <= limits.max_frames:
        raise DemoError(f"frames must be from 1 to {limits.max_frames}, got {n}")
    return n


def make_request(prompt, seed, steps, guidance, resolution, frames, plan, limits, token_grid: Callable,
                 device: str) -> Request:
    """Check every input against `limits`; DemoError names the first bad one. token_grid: (height, width, frames)
    -> the transformer's token grid or None, for the cap on tokens."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoError("the prompt is empty: type a prompt or pick an example")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DemoError(f"the prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS})")
    seed = as_number(seed, "seed", whole=True)
    if not 0 <= seed <= MAX_SEED:
        raise DemoError(f"seed must be from 0 to {MAX_SEED}, got {seed}")
    steps = as_number(steps, "steps", whole=True)
    if not 1 <= steps <= limits.max_steps:
        raise DemoError(f"steps must be from 1 to {limits.max_steps}, got {steps}")
    guidance = as_number(guidance, "guidance")
    if not 0.0 <= guidance <= limits.max_guidance:
        raise DemoError(f"guidance must be from 0 to {limits.max_guidance:g}, got {guidance:g}")
    height, width = parse_resolution(resolution, limits)
    frames = check_frames(frames, limits)
    grid = token_grid(height, width, frames)
    if limits.max_tokens is not None and grid is not None and grid.num_tokens > limits.max_tokens:
        raise DemoError(f"{frames} frames at {height}x{width} is {grid.num_tokens} tokens, more than this demo "
                        f"runs on the {device} ({limits.max_tokens}); use fewer frames or a smaller size")
    plan_json = json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":"))
    return Request(prompt, seed, steps, round(guidance, 6), height, width, frames, plan_json)
