"""Measured (not estimated) time: of whole attention modules (forward hooks) and of attention kernels alone."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class AttentionTimer:
    """Accumulates wall time of every attention module's forward (synchronising CUDA around each call): the
    modules' projections, norms, RoPE and cross-attention included, which no plan shortens."""

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


class KernelTimer:
    """Accumulates the time of attention kernels alone: every executor call and dense SDPA call that `attend` makes
    in covered self-attention (what a plan changes), without projections, norms, RoPE or cross-attention.

    On CUDA each call is bracketed by CUDA events and the total is read once, at the end (no sync per call); on CPU
    a wall-clock timer brackets it. Calls inside a torch.compile graph are not timed (a timer would break it).
    """

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._events: list = []

    @contextmanager
    def measure(self):
        _ACTIVE_KERNEL_TIMERS.append(self)
        try:
            yield self
        finally:
            _ACTIVE_KERNEL_TIMERS.remove(self)
            if self._events:
                torch.cuda.synchronize()
                self.seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
                self._events.clear()

    def _call(self, fn, args, kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        self.calls += 1
        if device is not None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return result
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds += time.perf_counter() - begin
        return result


_ACTIVE_KERNEL_TIMERS: list[KernelTimer] = []


def kernel_call(fn, *args, **kwargs):
    """fn(*args, **kwargs), timed by the innermost active KernelTimer, if any."""
    if not _ACTIVE_KERNEL_TIMERS or torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    return _ACTIVE_KERNEL_TIMERS[-1]._call(fn, args, kwargs)
