"""Where a result came from, for result files: the command that ran, the hardware and the versions."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def invoked_command() -> str | None:
    """The `dit-sparse ...` command line that is running, for the result file (None when called from Python)."""
    return "dit-sparse " + " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "dit-sparse" else None


def hardware(device: str) -> dict[str, Any]:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # Other work on the machine skews CPU timings badly (thread oversubscription): record it.
            "load_average_1min": os.getloadavg()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    out = {"dit_sparse": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out
