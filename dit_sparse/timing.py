"""Measured (not estimated) time spent inside attention modules, with plain forward hooks."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class AttentionTimer:
    """Accumulates wall time of every attention module's forward (synchronising CUDA around each call)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._starts: dict[int, float] = {}

    def _sync(self, module):
        param = next(module.parameters(), None)
        if param is not None and param.is_cuda:
            torch.cuda.synchronize(param.device)

    def _pre(self, module, args):
        self._sync(module)
        self._starts[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        self._sync(module)
        self.seconds += time.perf_counter() - self._starts.pop(id(module))
        self.calls += 1

    @contextmanager
    def measure(self, *transformers: torch.nn.Module):
        handles = []
        for transformer in transformers:
            for module in transformer.modules():
                if hasattr(module, "processor") and hasattr(module, "to_q"):
                    handles.append(module.register_forward_pre_hook(self._pre))
                    handles.append(module.register_forward_hook(self._post))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
