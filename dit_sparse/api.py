"""One verb to apply a plan, one to remove it, one to say what was applied."""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import UnsupportedModelError, adapter_for_transformer, has_adapter
from .adapters.base import ModelAdapter
from .call_watch import WATCH
from .executors import ExecutorError, get_executor
from .plan import SparsePlan
from .processor import (
    AlreadyAppliedError,
    SparseProcessor,
    attention_modules,
    bound_processor,
    set_module_processor,
    unwrap_compiled,
)
from .strategies.base import BuildContext

_ATTR = "_dit_sparse_processor"

__all__ = ["AlreadyAppliedError", "apply", "in_noise_units", "noise_levels", "remove", "summary", "transformers_of"]


def transformers_of(pipe_or_transformer) -> list[torch.nn.Module]:
    """The denoising transformers of a pipeline (Wan 2.2 A14B has two), or the transformer itself; a transformer
    wrapped by torch.compile stands for the one it wraps, which runs the plan's hooks and processors."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [unwrap_compiled(pipe_or_transformer)]
    found = [getattr(pipe_or_transformer, name, None) for name in ("transformer", "transformer_2")]
    found = [unwrap_compiled(t) for t in found if t is not None]
    if not found:
        raise TypeError(f"{type(pipe_or_transformer).__name__} has no `transformer`; pass a pipeline or a transformer")
    return found


def apply(pipe_or_transformer, plan: SparsePlan, executor: str | None = None,
          block_size: tuple[int, int] | None = None) -> SparseProcessor:
    """Run `plan` in every covered self-attention of the pipeline's transformer(s). Refuses to apply twice.

    Every check runs before anything changes: an unsupported model or a plan for another model leaves the
    model exactly as it was.
    """
    transformers = transformers_of(pipe_or_transformer)
    processor = SparseProcessor(plan, executor=executor, block_size=block_size)
    try:
        _apply(processor, pipe_or_transformer, transformers)
    finally:
        WATCH.release(processor)  # bound; or refused, and never to be called
    return processor


def _apply(processor: SparseProcessor, pipe_or_transformer, transformers: list[torch.nn.Module]) -> None:
    for transformer in transformers:
        if getattr(transformer, _ATTR, None) is not None or _processors_on(transformer):
            # The second case: the one-line form (set_attn_processor) put a processor there.
            raise AlreadyAppliedError(
                f"{type(transformer).__name__} already runs a dit-sparse plan; call dit_sparse.remove(...) first"
            )
        processor.check_plan(transformer, adapter_for_transformer(transformer))
    scheduler = (None if isinstance(pipe_or_transformer, torch.nn.Module)
                 else getattr(pipe_or_transformer, "scheduler", None))
    for transformer in transformers:
        modules = attention_modules(transformer)
        originals = {name: module.processor for name, module in modules.items()}
        processor.bind(transformer, originals)
        if scheduler is not None:
            processor.bind_scheduler(transformer, scheduler)
        for module in modules.values():
            set_module_processor(module, processor)
        setattr(transformer, _ATTR, processor)


def noise_levels(pipe, num_inference_steps: int, **set_timesteps_kwargs) -> list[float]:
    """The noise level (1 pure noise, 0 clean) of every step `pipe` runs at `num_inference_steps`, from a copy of
    its scheduler (pass what the pipeline passes to `set_timesteps`, e.g. Flux's `mu`, where it passes more)."""
    import copy

    scheduler = copy.deepcopy(getattr(pipe, "scheduler", None))
    if scheduler is None:
        raise TypeError(f"{type(pipe).__name__} has no scheduler; pass a diffusers pipeline")
    scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    levels = adapter_for_transformer(transformers_of(pipe)[0]).scheduler_noise_levels(scheduler)
    return levels[:num_inference_steps]


def in_noise_units(plan: SparsePlan, pipe_or_levels, num_inference_steps: int | None = None,
                   **set_timesteps_kwargs) -> SparsePlan:
    """`plan` with its dense steps in noise levels, running the same steps dense as it does counted in steps at
    `num_inference_steps` of this pipeline's scheduler (or on the step grid `pipe_or_levels`, one noise level per
    step). A plan in noise levels runs alike in every form of applying it: `apply(pipe)`, `apply(transformer)` and
    `transformer.set_attn_processor(SparseProcessor(plan))`."""
    if isinstance(pipe_or_levels, (list, tuple)):
        levels = pipe_or_levels
    else:
        if num_inference_steps is None:
            raise TypeError("in_noise_units(plan, pipe, num_inference_steps): give the step count the plan runs at")
        levels = noise_levels(pipe_or_levels, num_inference_steps, **set_timesteps_kwargs)
    return replace(plan, schedule=plan.schedule.in_noise_units(levels))


def _processors_on(transformer) -> set:
    return {m.processor for m in attention_modules(transformer).values() if isinstance(m.processor, SparseProcessor)}


def _stock_processors(model: torch.nn.Module) -> dict[str, object]:
    """The processors `model`'s constructor installs, by module name, from a copy built from its config without
    weights (some modules get a processor other than their class's default: Sana's linear attention)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            fresh = type(model).from_config(model.config)
    except Exception:  # no config, or a constructor that needs more: each module's default processor
        return {}
    return {name: m.processor for name, m in fresh.named_modules()
            if hasattr(m, "processor") and not isinstance(m.processor, torch.nn.Module)}


def remove(pipe_or_transformer) -> None:
    """Put back the processors that were there before `apply`, or the model's stock ones after the one-line form
    (on any model, supported or not)."""
    for transformer in transformers_of(pipe_or_transformer):
        processors = _processors_on(transformer)
        applied = getattr(transformer, _ATTR, None)
        for bound in (applied, bound_processor(transformer)):
            if bound is not None:
                processors.add(bound)
        for processor in processors:
            if id(transformer) in processor._states:
                restore = processor.unbind(transformer)
                for name, module in attention_modules(transformer).items():
                    if name in restore:
                        set_module_processor(module, restore[name])
        # A one-line-form processor that never bound (its plan failed the check at the first call, or the model has
        # no adapter): stock ones.
        unbound = {name: m for name, m in transformer.named_modules()
                   if isinstance(getattr(m, "processor", None), SparseProcessor)}
        if unbound:
            supported = has_adapter(transformer)
            adapter = adapter_for_transformer(transformer) if supported else ModelAdapter()
            stock = {} if supported else _stock_processors(transformer)
            for name, module in unbound.items():
                WATCH.release(module.processor)  # it can be called no more
                set_module_processor(module, stock.get(name) or adapter.stock_processor(module))
        if applied is not None:
            delattr(transformer, _ATTR)


def summary(pipe_or_transformer) -> str:
    """Which strategy runs where, and the expected attention density at the last grid seen."""
    lines = []
    for transformer in transformers_of(pipe_or_transformer):
        processors = _processors_on(transformer)
        if not processors:
            lines.append(f"{type(transformer).__name__}: no dit-sparse plan applied")
            continue
        for processor in processors:
            if id(transformer) in processor._states or getattr(transformer, _ATTR, None) is processor:
                lines.extend(_describe(processor, transformer))
                continue
            try:
                processor.check_plan(transformer)
                state = "not bound yet (the one-line form binds at the first call)"
            except (ValueError, UnsupportedModelError) as e:
                state = f"not usable: {e}; call dit_sparse.remove(...) to restore the stock processors"
            lines.append(f"{type(transformer).__name__}: a dit-sparse processor is set but {state}")
    return "\n".join(lines)


def _describe(processor: SparseProcessor, transformer) -> list[str]:
    plan = processor.plan
    adapter = adapter_for_transformer(transformer)
    grid = processor.grid_of(transformer)
    sched = plan.schedule
    lines = [
        f"{type(transformer).__name__} ({adapter.family}): {plan.model.num_layers} covered layers x "
        f"{plan.model.num_heads} heads, executor={processor.executor_name or 'auto'}",
        f"  dense steps: {sched.dense_steps_text()}",
        f"  dense layers {list(sched.dense_layers)}, refresh every {sched.refresh_interval} steps",
    ]
    device = next(transformer.parameters()).device
    blocks = (processor.block_size
              or get_executor(processor.executor_name, device).block_sizes(device, plan.model.head_dim))
    densities, fp8 = [], False
    for name, _layer in adapter.covered_modules(transformer):
        heads = plan.heads_for(name)
        fp8 = fp8 or any(spec.fp8 for spec in heads)
        groups: dict[str, int] = {}
        for spec in heads:
            groups[spec.describe()] = groups.get(spec.describe(), 0) + 1
        density = _expected_density(heads, grid, blocks) if grid is not None else None
        if density is not None:
            densities.append(density)
        shown = "n/a" if density is None else f"{density:.1%}"
        desc = ", ".join(f"{n}x {d}" for d, n in groups.items())
        lines.append(f"  {name:<32} density {shown:>6}  {desc}")
    if densities:
        lines.append(f"  expected attention density over covered layers: {sum(densities) / len(densities):.1%}"
                     f" (grid {grid.frames}x{grid.height}x{grid.width}; dynamic heads counted as dense, the dense "
                     f"refreshes of re-scaled and reuse heads not counted)")
    note = _fp8_note(processor, device) if fp8 else None
    if note:
        lines.append(f"  note: {note}")
    if processor.stats.calls:
        lines.append(f"  executed so far: {processor.stats.executed_density:.1%} of dense attention "
                     f"over {processor.stats.calls} calls")
    return lines


def _fp8_note(processor: SparseProcessor, device) -> str | None:
    """The executor's word on how the plan's fp8 heads run on ``device`` (e.g. in 16 bits where FP8 is slower)."""
    try:
        executor = get_executor(processor.executor_name, device)
    except ExecutorError:
        return None
    return executor.fp8_note(device) if executor.fp8_note is not None else None


def _expected_density(heads, grid, blocks: tuple[int, int]) -> float:
    """Mean over heads of the static layouts' density at the executor's blocks (dynamic heads counted as dense)."""
    total = 0.0
    for spec in heads:
        strategy = spec.impl
        if not strategy.computes:
            continue
        if strategy.dynamic or strategy.dense:
            total += 1.0
            continue
        total += strategy.layout(spec.param_dict, BuildContext(grid, *blocks)).density()
    return total / len(heads)
