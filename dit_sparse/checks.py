"""Checks of command-line arguments that every command shares, run before any work: sizes, counts, output folders.

Each failure is an ArgumentError whose message names the option, what was wrong and how to fix it."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import WriteError, check_writable_folder


class ArgumentError(ValueError):
    """Bad arguments for a command: the message says what was wrong and how to fix it."""


def check_out_folder(out: str | os.PathLike) -> None:
    """Before any work: an --out folder must be a folder we can write in (created here, then a probe file written
    and removed), else the results would fail to write at the end, after the work."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ArgumentError(f"--out {out} is an existing file; --out takes a folder")
    try:
        check_writable_folder(out)
    except WriteError as e:
        raise ArgumentError(f"{e} (checked before any work; give a writable --out)") from None


def check_positive(**options) -> None:
    """Each named command-line option that was given (not None) must be > 0."""
    for name, value in options.items():
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")


MAX_SIDE = 16384  # pixels: no video DiT generates more; beyond it a size is a typo, not a request


MAX_FRAMES = 4096


def check_sizes(height: int | None = None, width: int | None = None, frames: int | None = None) -> None:
    """Each given size is positive and plausible (an absurd one, e.g. --height 100000, is a typo)."""
    check_positive(height=height, width=width, frames=frames)
    for name, value, limit, unit in (("height", height, MAX_SIDE, "pixels"), ("width", width, MAX_SIDE, "pixels"),
                                     ("frames", frames, MAX_FRAMES, "frames")):
        if value is not None and value > limit:
            raise ArgumentError(f"--{name} {value} is not a plausible size (at most {limit:,} {unit}); "
                                "is it a typo?")
