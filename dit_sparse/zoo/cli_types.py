"""argparse value types shared by the zoo's command lines."""

from __future__ import annotations

import argparse


def float_pair(text: str, example: str) -> tuple[float, float]:
    """``"LO,HI"`` -> ``(LO, HI)``; callers check the bounds their option needs."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like {example}, got {text!r}") from None
    return lo, hi
