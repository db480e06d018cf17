"""What a search tells its user while it runs: progress lines and warnings on the `dit_sparse.search.progress`
logger (`dit-sparse search` prints them to stderr unless --quiet; from Python, configure logging to see them), and
tqdm bars on stderr when a run's `progress` setting is on."""

from __future__ import annotations

import logging
import sys

PROGRESS = logging.getLogger("dit_sparse.search.progress")


def bar(enabled: bool, total: int, desc: str, unit: str):
    """A tqdm progress bar on stderr, or None when `enabled` is False."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.1f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"
