"""Torch CPU threads for a whole search: by default the cores that other processes leave free."""

from __future__ import annotations

import contextlib
import os

import torch


def auto_threads() -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load average).

    Small tensor ops with more threads than free cores spend their time waiting for descheduled threads: on a
    2-core machine shared with a training job, tiny-shapes calibration ran several times faster on one thread.
    """
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    free = int((os.cpu_count() or 1) - busy + 0.5)
    return max(1, min(torch.get_num_threads(), free))


@contextlib.contextmanager
def cpu_threads(device: str, threads: int | None):
    """Torch CPU threads for a whole search (None: the cores not already busy); restored afterwards."""
    previous_threads = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(threads or auto_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
