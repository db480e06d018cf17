"""What binding a processor to a transformer makes: per attention module a Binding, per transformer a
TransformerState, the hooks that feed them, and the reading of the transformer's forward arguments.

diffusers puts one processor object on every attention module and never says which module is which, so the
processor maps each attention module of its transformer to its name and layer (a Binding, kept on the module
itself) and registers two hooks on the transformer: a forward pre-hook that captures the grid, timestep and text of
every call, and a stateful diffusers hook that receives the pipeline's cache context (CFG branch, step index and
count, where the pipeline passes them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import ModelAdapter, nearest_class_name
from .adapters.base import TokenLayout
from .layout import Grid
from .parallel.topology import SequenceParallel
from .state import GenerationState
from .steps import StepPosition, StepTracker

CONTEXT_HOOK = "dit_sparse_context"
# The attribute of a bound attention module that holds its Binding: the processor finds it there rather than by
# the module's id, so that torch.compile's guards on repeated blocks do not tell one block from another.
BINDING = "_dit_sparse_binding"
UNNAMED_BRANCH = "unknown"  # a call outside any cache context, or the one-line form's first call


@dataclass
class Binding:
    """One attention module of a bound transformer."""

    name: str
    layer: int
    covered: bool
    stock: Any  # the family's processor, for what the plan does not cover
    stock_arguments: frozenset = frozenset()  # the keyword arguments the stock processor takes
    output_follows_attention: bool = True
    sees_text: bool | None = None  # whether its attention sees text tokens (None: not called yet)
    owner: Any = None  # the SparseProcessor that bound it
    state: Any = None  # its transformer's TransformerState
    site: Any = None  # this forward's AttentionSite (covered modules; set by the forward pre-hook)
    head_order: tuple[int, ...] | None = None  # under Ulysses, the order that evens the ranks' work (None: as is)


@dataclass
class TransformerState:
    """Everything the processor keeps per bound transformer."""

    transformer_ref: Any
    adapter: ModelAdapter
    bindings: dict[int, Binding]
    originals: dict[str, Any] | None  # module name -> processor before apply (None in the one-line form)
    steps: StepTracker = field(default_factory=StepTracker)
    grid: Grid | None = None
    tokens: TokenLayout | None = None  # this forward's token layout, as covered attention calls see it
    position: StepPosition = field(default_factory=StepPosition)
    branch: str = UNNAMED_BRANCH
    unnamed_step: float | None = None  # the noise level of a first call whose branch name nobody received
    generation: GenerationState = field(default_factory=GenerationState)
    handles: list = field(default_factory=list)
    context_hook: Any = None
    # Under diffusers' context parallelism (enable_parallelism, before or after the plan): the ParallelConfig the
    # stock processors take, and this rank's place in its mesh; None on one device.
    parallel_config: Any = None
    parallel: SequenceParallel | None = None
    text_length: int | None = None  # text tokens in this forward's input (encoder_hidden_states), before any split
    # The one-line form's first call: bound during it, it runs stock attention until it runs again (call_watch.py).
    first_call_pending: bool = False
    capture_armed: bool = True  # False while a call captured before its pre-hook runs


def attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module that carries a diffusers attention processor, by name."""
    return {name: m for name, m in transformer.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")}


def set_module_processor(module: torch.nn.Module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def unwrap_compiled(module):
    """The module torch.compile wrapped (its OptimizedModule keeps it as `_orig_mod`), or `module` itself: plans,
    hooks and processors live on the original module, which the compiled one runs."""
    while type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None),
                                                                    torch.nn.Module):
        module = module._orig_mod
    return module


def context_hook(owner):
    """A do-nothing stateful diffusers hook: diffusers hands it the pipeline's cache context on every call.
    It names its `owner`, the processor bound to the transformer (`bound_processor`).

    Built on first use so that importing dit_sparse does not import diffusers (which imports triton).
    """
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state = StateManager(_NoState)

        def reset_state(self, module):
            # Pipelines reset stateful hooks after each generation; our step state resets itself by timestep.
            return module

    hook = _ContextHook()
    hook.owner = owner
    return hook


def hook_registry(transformer):
    from diffusers.hooks.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(transformer)


def bound_processor(transformer: torch.nn.Module):
    """The SparseProcessor whose hooks are on `transformer` (bound by `apply` or by the one-line form), or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(CONTEXT_HOOK) if registry is not None else None
    return getattr(hook, "owner", None)


def forward_arguments(adapter: ModelAdapter, transformer, args, kwargs) -> inspect.BoundArguments:
    """The forward's arguments by name, bound by the transformer's own forward signature (a subclass may add
    arguments) or, where that signature passes them on as *args/**kwargs to super().forward, by its family's:
    the forward of the first class in its MRO that the adapter names."""
    cls = type(transformer)
    family = next(c for c in cls.__mro__ if c.__name__ == nearest_class_name(cls, adapter.transformer_classes))
    bound, error = {}, None
    for owner in dict.fromkeys((cls, family)):
        try:
            bound[owner] = inspect.signature(owner.forward).bind_partial(transformer, *args, **kwargs)
        except TypeError as e:
            error = e
    own = bound.get(cls)
    varargs = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    passes_on = own is not None and any(
        own.signature.parameters[name].kind in varargs and value for name, value in own.arguments.items())
    for candidate in (bound.get(family), own) if passes_on else (own, bound.get(family)):
        if candidate is not None and "hidden_states" in candidate.arguments:
            return candidate
    why = f" ({error})" if error is not None else ""
    raise TypeError(
        f"dit-sparse reads the token grid and timestep from {cls.__name__}.forward's arguments and finds no "
        f"hidden_states in them, bound by {family.__name__}.forward's signature{why}: a subclass must pass "
        f"hidden_states and timestep on by name, or keep {family.__name__}.forward's signature")
