"""Executor registry. An executor runs (q, k, v, layout) -> (out, lse) with q, k, v in (B, S, H, D).

out has the dtype of q; lse is fp32 (B, H, S), natural log of the softmax denominator including the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..extras import MissingExtra, require


def anywhere(device) -> bool:
    return True


@dataclass(frozen=True)
class Executor:
    name: str
    run: Callable  # (q, k, v, layout, *, scale=None, fp8=False) -> (out, lse)
    block_sizes: Callable[[torch.device, int], tuple[int, int]]  # (device, head_dim) -> (block_q, block_k)
    available: Callable[[torch.device], bool] = anywhere
    priority: int = 0  # higher wins when choosing the best executor for a device
    # (device) -> why a plan's fp8 heads do not run in FP8 on this device, or None; shown in dit_sparse.summary
    fp8_note: Callable[[torch.device], str | None] | None = None
    # (layout, batch, heads, dtype, device) -> None: build the tables `run` derives from a layout, on the host before
    # a forward (so that no compiled graph traces their construction and no sparse step waits for it), or None
    prepare: Callable | None = None


EXECUTORS: dict[str, Executor] = {}
# Executors registered only where they can run, with what they need.
OPTIONAL_EXECUTORS = {"triton": "a CUDA GPU (--device cuda) and the triton package"}
# The extra of pyproject.toml that brings each optional executor's package (dit_sparse.extras).
EXECUTOR_EXTRAS = {"triton": "triton"}


class ExecutorError(ValueError):
    pass


class ExecutorExtraMissing(MissingExtra, ExecutorError):
    """The executor's package is not installed: both an ExecutorError and a MissingExtra (names the pip command)."""


def require_executor_extra(name: str | None) -> None:
    """Raise ExecutorExtraMissing when ``name`` is an optional executor whose extra is not installed."""
    if name in EXECUTOR_EXTRAS:
        require(EXECUTOR_EXTRAS[name], what=f"executor {name!r}", error=ExecutorExtraMissing)


def register_executor(executor: Executor) -> Executor:
    EXECUTORS[executor.name] = executor
    return executor


def load_optional_kernels():
    # The Triton executor lives in dit_sparse.kernels.executor and registers itself on import; only try when CUDA
    # exists so importing dit_sparse never imports triton eagerly.
    if torch.cuda.is_available() and "triton" not in EXECUTORS:
        try:
            import dit_sparse.kernels.executor  # noqa: F401
        except ImportError:
            pass


def known_executor(name: str) -> Executor:
    """The registered executor of this name, whatever the device; ExecutorError says why there is none."""
    load_optional_kernels()
    if name not in EXECUTORS:
        if name in OPTIONAL_EXECUTORS:
            require_executor_extra(name)
            raise ExecutorError(f"executor {name!r} needs {OPTIONAL_EXECUTORS[name]}; here it is not available "
                                f"(available: {', '.join(sorted(EXECUTORS))})")
        raise ExecutorError(f"unknown executor {name!r}; known: {', '.join(sorted({*EXECUTORS, *OPTIONAL_EXECUTORS}))}")
    return EXECUTORS[name]


def get_executor(name: str | None, device: torch.device | str = "cpu") -> Executor:
    device = torch.device(device)
    load_optional_kernels()
    if name is None:
        usable = [e for e in EXECUTORS.values() if e.available(device)]
        return max(usable, key=lambda e: e.priority)
    executor = known_executor(name)
    if not executor.available(device):
        needs = f"; it needs {OPTIONAL_EXECUTORS[name]}" if name in OPTIONAL_EXECUTORS else ""
        raise ExecutorError(f"executor {name!r} cannot run on {device}{needs}")
    return executor


from . import cpu, reference  # noqa: E402,F401  (registration side effects)

__all__ = ["EXECUTORS", "Executor", "ExecutorError", "ExecutorExtraMissing", "register_executor", "get_executor",
           "known_executor", "load_optional_kernels", "require_executor_extra"]
