"""What a strategy is: a named rule with validated parameters that compiles to a BlockLayout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..layout import BlockLayout, Grid


@dataclass(frozen=True)
class Param:
    """One strategy parameter: its default and a check returning an error message or None."""

    default: Any
    check: Callable[[Any], str | None]
    doc: str = ""


@dataclass(frozen=True)
class BuildContext:
    """Everything a strategy may look at to build a layout for one head group.

    q, k: (B, S, G, D) video tokens of the group's heads, post-RoPE; only dynamic strategies read them.
    """

    grid: Grid
    block_q: int
    block_k: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.grid.num_tokens


class Strategy:
    """Base class. Static strategies return a (1, 1, NQ, K) layout that depends only on the grid and params."""

    name: str = ""
    # What the strategy needs and does; callers ask these rather than compare names.
    dense: bool = False  # every query attends every key: the exact computation (`dense`)
    dynamic: bool = False  # the layout is estimated from q and k (refreshed), not fixed by the grid
    pooled: bool = False  # some keys are visited at pooled (coarser) levels: `pyramid`
    computes: bool = True  # False when nothing runs at a sparse step: `skip`, and `reuse` between refreshes
    reuses: bool = False  # True for `reuse`: dense at refresh steps, that output reused until the next one
    params: dict[str, Param] = {}

    def layout(self, params: dict[str, Any], ctx: BuildContext) -> BlockLayout:
        raise NotImplementedError


def check_fraction(open_low: bool = True):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
            return f"must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}"
        return None

    return check


def check_bool(value):
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def check_nonneg_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"must be a non-negative integer, got {value!r}"
    return None


def check_extent(value):
    """A half-width: tokens (int >= 0) or a fraction of the grid dimension (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be an int (tokens) or a float (fraction of the grid), got {value!r}"
    if isinstance(value, int) and value < 0:
        return f"must be >= 0 tokens, got {value!r}"
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        return f"a fraction of the grid must be in [0, 1], got {value!r}"
    return None


def check_extents(count: int):
    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) != count:
            return f"must be a list of {count} half-widths, got {value!r}"
        for item in value:
            err = check_extent(item)
            if err:
                return err
        return None

    return check


def resolve_extent(value: int | float, size: int) -> int:
    """Half-width in tokens: ints as given, floats as a fraction of the grid dimension (rounded)."""
    if isinstance(value, float):
        return int(round(value * size))
    return int(value)
