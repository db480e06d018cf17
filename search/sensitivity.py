"""How much each covered layer's attention error matters for the transformer's output.

At sampled steps of the first calibration generation(s), right after a transformer call, the call is repeated
once per covered attention module with Gaussian noise of relative size ``eps`` added to that module's output;
the layer's sensitivity is the relative change of the transformer output divided by ``eps``. An error early in
the network passes through every later block, so sensitivities differ; the solver can weight each layer's
attention error by its sensitivity (normalised to mean 1) so that its budget tracks the output, not just the
attention.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class LayerSensitivity:
    """A forward hook for the transformer; `observer` (paused while re-running) and `timer` keep their books
    free of the extra calls, whose time is added to ``observer.seconds``."""

    def __init__(self, transformer: torch.nn.Module, modules: list[torch.nn.Module], observer, steps: set[int],
                 timer=None, eps: float = 0.05, seed: int = 0):
        self.transformer, self.modules, self.observer, self.timer = transformer, modules, observer, timer
        self.steps, self.eps = set(steps), eps
        self.generator = torch.Generator().manual_seed(seed)
        self.sums = np.zeros(len(modules))
        self.count = 0
        self.active = True
        self._inside = False

    def attach(self):
        return self.transformer.register_forward_hook(self._after_call, with_kwargs=True)

    def values(self) -> list[float] | None:
        return (self.sums / self.count).tolist() if self.count else None

    @torch.no_grad()
    def _after_call(self, module, args, kwargs, output):
        if self._inside or not self.active or self.observer.last_step not in self.steps:
            return
        reference = first_tensor(output).float()
        start = time.perf_counter()
        self._inside, self.observer.paused = True, True
        if self.timer is not None:
            self.timer.paused = True
        try:
            for li, attn in enumerate(self.modules):
                handle = attn.register_forward_hook(self._perturb)
                try:
                    perturbed = first_tensor(module(*args, **kwargs)).float()
                finally:
                    handle.remove()
                self.sums[li] += float((perturbed - reference).norm() / (reference.norm() * self.eps + 1e-30))
            self.count += 1
        finally:
            self._inside, self.observer.paused = False, False
            if self.timer is not None:
                self.timer.paused = False
            self.observer.seconds += time.perf_counter() - start

    def _perturb(self, attn, args, output):
        out = first_tensor(output)
        noise = torch.randn(out.shape, generator=self.generator).to(out.device, out.dtype)
        noise = noise * (self.eps * out.float().norm() / noise.float().norm()).to(out.dtype)
        if isinstance(output, torch.Tensor):
            return output + noise
        return (output[0] + noise, *output[1:])
