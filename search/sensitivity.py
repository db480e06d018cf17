"""How much each covered layer's attention error matters for the transformer's output, and how much an error at
each sampled denoising step matters for the generated result.

At sampled steps of the first calibration generation(s), right after a transformer call, the call is repeated
once per covered attention module with Gaussian noise of relative size ``eps`` added to that module's output;
the layer's sensitivity is the relative change of the transformer output divided by ``eps``. An error early in
the network passes through every later block, so sensitivities differ; the solver can weight each layer's
attention error by its sensitivity (normalised to mean 1) so that its budget tracks the output, not just the
attention.

Steps: after the calibration generations, the first prompt is generated again once per sampled step with
Gaussian noise of relative size ``eps`` added to the transformer's output (every call of that step, both CFG
branches); the step's sensitivity is the relative change of the final latents divided by ``eps``. It includes
what the per-layer number cannot: the step's share of the trajectory and how later steps damp or amplify the
change. The solver can weight each sampled step's attention error by it.
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
        return with_relative_noise(output, self.eps, self.generator)


def with_relative_noise(output, eps: float, generator: torch.Generator):
    """A module's output with Gaussian noise of norm ``eps`` times its first tensor's norm added to that tensor."""
    out = first_tensor(output)
    noise = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
    noise = noise * (eps * out.float().norm() / noise.float().norm()).to(out.dtype)
    if isinstance(output, torch.Tensor):
        return output + noise
    if isinstance(output, (tuple, list)):
        return (output[0] + noise, *output[1:])
    output.sample = output.sample + noise
    return output


def pipeline_output(output) -> torch.Tensor:
    """The tensor a pipeline call returned (latents with output_type="latent")."""
    if isinstance(output, torch.Tensor):
        return output
    first = output[0]  # a diffusers BaseOutput or a tuple
    return first if isinstance(first, torch.Tensor) else torch.as_tensor(first)


class StepSensitivity:
    """A forward hook for the transformer that perturbs its output on the calls of step ``target`` only.

    The step is counted with ``on_step`` (the pipeline's step-end callback), so it works while the calibration
    observer is paused.
    """

    def __init__(self, transformer: torch.nn.Module, eps: float = 0.05, seed: int = 0):
        self.transformer, self.eps = transformer, eps
        self.generator = torch.Generator().manual_seed(seed)
        self.target: int | None = None
        self.step = 0

    def attach(self):
        return self.transformer.register_forward_hook(self._after_call)

    def start(self, target: int | None) -> None:
        self.target, self.step = target, 0

    def on_step(self) -> None:
        self.step += 1

    @torch.no_grad()
    def _after_call(self, module, args, output):
        if self.target is None or self.step != self.target:
            return None
        return with_relative_noise(output, self.eps, self.generator)


def measure_step_sensitivity(run, index: int, steps: list[int], reference: torch.Tensor,
                             perturb: StepSensitivity) -> list[float]:
    """Relative change of generation ``index``'s result per unit relative perturbation at each of ``steps``."""
    values = []
    ref = reference.float()
    for step in steps:
        perturb.start(step)
        try:
            out = pipeline_output(run(index, perturb.on_step)).float()
        finally:
            perturb.start(None)
        values.append(float((out - ref).norm() / (ref.norm() * perturb.eps + 1e-30)))
    return values
