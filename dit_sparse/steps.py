"""Which denoising step a forward is, from what every form of applying a plan can observe, and what the plan's
schedule runs dense there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapters import ModelAdapter
from .plan import Schedule


class UnknownStepError(RuntimeError):
    """The plan runs some denoising steps dense, but nothing told the processor which step this call is."""


@dataclass
class StepPosition:
    """Where one forward sits in its generation.

    step: distinct noise levels seen in this generation before this one (the clock of caches and refreshes).
    index, total: the step's place in the pipeline's schedule, where the pipeline tells it; only schedules that
    count steps need them.
    """

    noise: float | None = None
    step: int | None = None
    index: int | None = None
    total: int | None = None
    new_generation: bool = False


@dataclass
class StepTracker:
    """The denoising step of each forward, from what every form of applying a plan can observe.

    Noise levels fall during a generation; one above the last starts a new generation. Calls at the same noise
    level (CFG branches, a second transformer) share a step: nothing here counts calls. The schedule position
    (index, total) comes from the pipeline's cache context when it passes one (Wan's pipelines, tiny-shapes), else
    from the scheduler `apply(pipe)` bound, matched by noise level.
    """

    levels: list[float] = field(default_factory=list)
    scheduler_ref: Any = None

    def update(self, noise: float | None, context, adapter: ModelAdapter) -> StepPosition:
        index = getattr(context, "step_index", None)
        total = getattr(context, "num_inference_steps", None)
        if noise is None:
            return StepPosition(index=index, total=total)
        new_generation = bool(self.levels) and noise > self.levels[-1] + 1e-6
        if new_generation:
            self.levels = []
        if not self.levels or abs(noise - self.levels[-1]) > 1e-6:
            self.levels.append(noise)
        if index is None or total is None:
            index, total = self._from_scheduler(noise, adapter)
        return StepPosition(noise, len(self.levels) - 1, index, total, new_generation)

    def _from_scheduler(self, noise: float, adapter: ModelAdapter) -> tuple[int | None, int | None]:
        scheduler = self.scheduler_ref() if self.scheduler_ref is not None else None
        levels = adapter.scheduler_noise_levels(scheduler) if scheduler is not None else None
        if not levels:
            return None, None
        distance = [abs(level - noise) for level in levels]
        nearest = min(range(len(levels)), key=distance.__getitem__)
        # The nearest step, when the noise level is less than half as far from it as from any other step (a bf16
        # timestep is off by up to 0.4%; neighbouring steps are further apart than that).
        others = distance[:nearest] + distance[nearest + 1:]
        if others and distance[nearest] * 2 >= min(others):
            return None, None
        return nearest, len(levels)



def dense_now(schedule: Schedule, position: StepPosition, layer: int) -> bool:
    """Whether `layer` runs dense at this step (`check_steps_known` made sure the schedule can say)."""
    if layer in schedule.dense_layers:
        return True
    if schedule.uses_noise_levels:
        return schedule.dense_at_noise(position.noise)
    if schedule.counts_steps:
        return schedule.dense_at_step(position.index, position.total)
    return False


def check_steps_known(schedule: Schedule, keeps_state: bool, position: StepPosition, transformer_name: str,
                      one_line_form: bool) -> None:
    """Refuse, before any attention of this forward runs, a plan whose schedule this form cannot follow: running it
    anyway would make another video than the one the plan was measured with."""
    if schedule.counts_steps and (position.index is None or position.total is None):
        why = ("the one-line form binds during the first call and cannot see that call's step count"
               if one_line_form else
               "its pipeline passes no step count in its cache context, and no scheduler is bound")
        raise UnknownStepError(
            f"the plan's dense steps are counted in steps ({schedule.dense_steps_text()}), and nothing tells "
            f"{transformer_name} where this step is: {why}. Apply the plan to the pipeline with "
            "dit_sparse.apply(pipe, plan), which reads the scheduler, or give the plan its dense steps in noise "
            "levels, which every form sees: plan = dit_sparse.in_noise_units(plan, pipe, num_inference_steps)")
    needs = ("dense steps in noise levels" if schedule.uses_noise_levels else
             "heads that keep state from step to step (reuse, re-scaled or dynamic)" if keeps_state else None)
    if needs and position.noise is None:
        raise UnknownStepError(
            f"the plan has {needs}, but {transformer_name}.forward gave no timestep the processor could read, so it "
            "cannot tell denoising steps apart: pass `timestep` to the transformer by name or in its usual position "
            "(a subclass must keep its parent's forward signature)")
