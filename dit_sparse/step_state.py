"""State kept from one denoising step to the next, and the host decisions made on it before a forward runs.

A plan's stateful heads (`reuse`, re-scaled softmax, dynamic layouts) decide at every step whether to compute or
to use what an earlier step kept. Those decisions depend on step numbers, which are Python ints: made inside a
compiled transformer block, every new step would be a new guard and a recompile. So they are made on the host,
in the transformer's forward pre-hook, for every covered module at once (`decide_module` in decide.py), and the block
only reads the outcome: a few booleans and, for forecasts, a small CPU tensor of weights. The bookkeeping moves
on when the decision is made; the tensors arrive when the module runs (each covered module runs once per forward).
"""

from __future__ import annotations

import torch

from .layout import Grid
from .state import ReuseDecision, ReuseEntry, ReuseStep


def forecast_weights(steps: list[int], step: int) -> list[float]:
    """Weights over outputs computed at `steps` (two or three, oldest first) whose weighted sum is the forecast at
    `step`: the Taylor expansion at the last point with derivatives from backward divided differences, as TaylorSeer
    does. The second-order term is f[s0, s1, s2] (step - s2)^2; Newton's polynomial would use (step - s2)(step - s1),
    which overshoots when the curvature estimate is noisy. The expansion is linear in the outputs."""
    s1, s2 = steps[-2], steps[-1]
    h, d = step - s2, s2 - s1
    if len(steps) == 2:  # y2 + h (y2 - y1) / d
        return [-h / d, 1 + h / d]
    s0 = steps[0]  # + h^2 ((y2 - y1) / d - (y1 - y0) / e) / g
    e, g = s1 - s0, s2 - s0
    return [h * h / (e * g), -h / d - h * h / g * (1 / d + 1 / e), 1 + h / d + h * h / (d * g)]


def weighted_sum(outputs: list[torch.Tensor], weights) -> torch.Tensor:
    """sum_i weights[i] * outputs[i] in float32, one pass per output and no temporaries (it runs at every reused
    step). `weights` may be a CPU tensor: its elements are scalars to the kernels, with no device sync."""
    if len(outputs) != len(weights):
        raise RuntimeError(f"a reused output has {len(outputs)} kept points for {len(weights)} forecast weights: a "
                           "covered attention module did not run at every step of the generation")
    forecast = outputs[-1].to(torch.float32, copy=True).mul_(weights[-1])  # a copy: never the kept output
    for y, w in zip(outputs[:-1], weights[:-1]):
        forecast.add_(y.to(torch.float32) * w)
    return forecast


def taylor_forecast(points: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """Forecast at `step` from computed outputs [(step, out), ...], oldest first (two or three points)."""
    weights = forecast_weights([s for s, _ in points], step)
    return weighted_sum([y for _, y in points], weights)


def decide_reuse(kept: ReuseEntry | None, *, step: int | None, batch: int, grid: Grid, dense_now: bool,
                 refresh_interval: int, extrapolate: bool, order: int) -> tuple[ReuseDecision, ReuseEntry | None]:
    """This step's decision for one reuse key and the bookkeeping after it (the outputs follow when it runs)."""
    # Outputs lag their steps where a module did not run at a step it was decided for (its CFG branch took the other
    # branch's output): then nothing kept is used.
    fits = kept is not None and len(kept.outputs) == len(kept.steps) and kept.batch == batch and kept.grid == grid
    if dense_now and not extrapolate:
        return ReuseDecision(reuse=False, keep=False), kept
    if not dense_now and fits and kept.refresh and step is not None and kept.steps[-1] is not None \
            and 0 < step - kept.steps[-1] < refresh_interval:
        points = kept.steps if order == 2 else kept.steps[-2:]
        if not extrapolate or len(points) < 2:
            return ReuseDecision(reuse=True), kept
        # float64 on the host: the same weights the Python floats gave (each is a scalar to the kernels).
        weights = torch.tensor(forecast_weights(points, step), dtype=torch.float64)
        return ReuseDecision(reuse=True, weights=weights), kept
    earlier = extrapolate and fits and step is not None and kept.steps[-1] is not None and kept.steps[-1] < step
    history = min(len(kept.steps), 2) if earlier else 0
    steps = (kept.steps[len(kept.steps) - history:] if history else []) + [step]
    after = ReuseEntry(batch, grid, steps, refresh=not dense_now, outputs=kept.outputs if history else [])
    return ReuseDecision(reuse=False, keep=True, history=history), after



def reused_output(step: ReuseStep) -> torch.Tensor:
    """A `reuse` output between refreshes: the newest computed output, or its forecast from the kept ones."""
    kept, decision = step.entry, step.decision
    if decision.weights is None:
        return kept.outputs[-1]
    points = len(decision.weights)
    return weighted_sum(kept.outputs[-points:], decision.weights).to(kept.outputs[-1].dtype)
