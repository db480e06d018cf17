"""SparseProcessor: the attention processor that executes a SparsePlan inside a diffusers transformer.

diffusers puts one processor object on every attention module and never says which module is which, so the
processor binds itself to the transformer that owns a module: eagerly in `apply`, or lazily on the first call in
the one-line form (`transformer.set_attn_processor(SparseProcessor(plan))`). Binding maps each attention module to
its name and layer, registers a forward pre-hook for the grid and timestep and a stateful diffusers hook that
receives the pipeline's cache context (step index and count, where the pipeline passes them). Modules the plan does
not cover run the family's own processor.
"""

from __future__ import annotations

import inspect
import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedModelError,
    adapter_for_transformer,
    has_adapter,
    nearest_class_name,
    supported_transformers,
)
from .attend import (
    AttentionSite,
    AttentionStats,
    HeadProgram,
    attend,
    decide_module,
    keep_module_output,
    reused_module_output,
    static_layout_at,
    whole_module_reuse,
)
from .branch_share import keep_for_other_branch, shared_output
from .executors import get_executor, known_executor
from .layout import Grid
from .parallel.attention import gather_split_text, parallel_attend
from .parallel.balance import balanced_order, head_cost
from .parallel.plans import context_parallel_plan
from .parallel.topology import SequenceParallel, context_parallel_config, sequence_parallel
from .plan import SparsePlan

logger = logging.getLogger(__name__)

_CONTEXT_HOOK = "dit_sparse_context"
# The attribute of a bound attention module that holds its _Binding: the processor finds it there rather than by
# the module's id, so that torch.compile's guards on repeated blocks do not tell one block from another.
_BINDING = "_dit_sparse_binding"
UNNAMED_BRANCH = "unknown"  # a call outside any cache context, or the one-line form's first call


class PlanMismatchError(ValueError):
    pass


class AlreadyAppliedError(RuntimeError):
    pass


class UnknownStepError(RuntimeError):
    """The plan runs some denoising steps dense, but nothing told the processor which step this call is."""


def _context_hook(owner: SparseProcessor):
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


def _hook_registry(transformer):
    from diffusers.hooks.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(transformer)


def bound_processor(transformer: torch.nn.Module) -> SparseProcessor | None:
    """The SparseProcessor whose hooks are on `transformer` (bound by `apply` or by the one-line form), or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(_CONTEXT_HOOK) if registry is not None else None
    return getattr(hook, "owner", None)


def unwrap_compiled(module):
    """The module torch.compile wrapped (its OptimizedModule keeps it as `_orig_mod`), or `module` itself: plans,
    hooks and processors live on the original module, which the compiled one runs."""
    while type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None),
                                                                    torch.nn.Module):
        module = module._orig_mod
    return module


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


@dataclass
class _Binding:
    name: str
    layer: int
    covered: bool
    stock: Any
    stock_arguments: frozenset = frozenset()  # the keyword arguments the stock processor takes
    output_follows_attention: bool = True
    saw_text: bool | None = None  # whether its attention saw text tokens (None: not called yet)
    owner: Any = None  # the SparseProcessor that bound it
    state: Any = None  # its transformer's _TransformerState
    site: Any = None  # this forward's AttentionSite (covered modules; set by the forward pre-hook)
    head_order: tuple[int, ...] | None = None  # under Ulysses, the order that evens the ranks' work (None: as is)


@dataclass
class _TransformerState:
    """Everything the processor keeps per bound transformer."""

    transformer_ref: Any
    adapter: ModelAdapter
    bindings: dict[int, _Binding]
    originals: dict[str, Any] | None  # module name -> processor before apply (None in the lazy form)
    steps: StepTracker = field(default_factory=StepTracker)
    grid: Grid | None = None
    position: StepPosition = field(default_factory=StepPosition)
    branch: str = UNNAMED_BRANCH
    unnamed_step: float | None = None  # the noise level of a first call whose branch name nobody received
    cache: dict = field(default_factory=dict)
    handles: list = field(default_factory=list)
    context_hook: Any = None
    # Under diffusers' context parallelism (enable_parallelism, before or after the plan): the ParallelConfig the
    # stock processors take, and this rank's place in its mesh; None on one device.
    parallel_config: Any = None
    parallel: SequenceParallel | None = None
    text_length: int | None = None  # text tokens in this forward's input (encoder_hidden_states), before any split


def attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module that carries a diffusers attention processor, by name."""
    return {name: m for name, m in transformer.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")}


def set_module_processor(module: torch.nn.Module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


class SparseProcessor:
    """Executes a SparsePlan in every self-attention it covers; other attention runs the family's own math.

    executor: "reference", "cpu", "triton" or None (the best available for the device).
    block_size: (block_q, block_k) to override the executor's choice.
    balance_heads: under Ulysses parallelism, reorder each module's heads so that every rank gets about the same
    work (an exact permutation of q, k, v and the output; docs/parallel.md).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, plan: SparsePlan, executor: str | None = None, block_size: tuple[int, int] | None = None,
                 balance_heads: bool = True):
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"SparseProcessor needs a SparsePlan, got {type(plan).__name__}")
        if block_size is not None and not (
                isinstance(block_size, (tuple, list)) and len(block_size) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
            raise ValueError(f"block_size must be (block_q, block_k), two positive integers, got {block_size!r}")
        self.plan = plan
        self.balance_heads = balance_heads
        self.executor_name = executor
        self.block_size = block_size
        self.stats = AttentionStats()
        self._states: dict[int, _TransformerState] = {}
        self._static_layouts: dict = {}
        # How each distinct head mix runs, made once: its head indices live on the device from the first forward on.
        self._programs: dict[tuple, HeadProgram] = {}
        self._head_orders: dict[tuple, tuple[int, ...] | None] = {}  # Ulysses head orders, per heads and grid
        # Called as observer(site, q, k, v, text) before every covered attention; calibration records through it.
        self.observers: list = []
        if executor is not None:
            known_executor(executor)  # fail early on an unknown name (the device is known at the first call)

    # -- binding ---------------------------------------------------------------------------------------------
    def bind(self, transformer: torch.nn.Module, originals: dict[str, Any] | None = None) -> None:
        """Map the transformer's attention modules to names and layers and install the context hooks."""
        if id(transformer) in self._states:
            return
        self._take_over(transformer)
        adapter = adapter_for_transformer(transformer)
        self.check_plan(transformer, adapter)
        config = context_parallel_config(transformer)
        if config is not None:  # enable_parallelism came first: refuse what cannot run now, before any hook exists
            context_parallel_plan(transformer)
            sequence_parallel(config.context_parallel_config, self.plan.model.num_heads, type(transformer).__name__)
        covered = dict(adapter.covered_modules(transformer))
        bindings = {}
        for name, module in attention_modules(transformer).items():
            stock = originals[name] if originals else adapter.stock_processor(module)
            bindings[id(module)] = _Binding(name, covered.get(name, -1), name in covered, stock,
                                            frozenset(inspect.signature(stock.__call__).parameters),
                                            adapter.output_follows_attention(module))
        state = _TransformerState(weakref.ref(transformer), adapter, bindings, originals)
        for module in attention_modules(transformer).values():
            binding = bindings[id(module)]
            binding.owner, binding.state = self, state
            setattr(module, _BINDING, binding)
        state.handles.append(transformer.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True))
        hook = _context_hook(self)
        _hook_registry(transformer).register_hook(hook, _CONTEXT_HOOK)
        state.context_hook = hook
        self._states[id(transformer)] = state

    def _take_over(self, transformer: torch.nn.Module) -> None:
        """Refuse to bind over another processor's hooks, except a one-line form's that no module runs any more (a
        second `set_attn_processor(SparseProcessor(...))` replaced it): that processor is done, and unbinds here."""
        previous = bound_processor(transformer)
        if previous is None or previous is self:
            return
        state = previous._states.get(id(transformer))
        name = type(transformer).__name__
        if state is not None and state.originals is not None:
            raise AlreadyAppliedError(
                f"{name} already runs a dit-sparse plan applied with dit_sparse.apply(); set_attn_processor replaced "
                "its processors but not the hooks apply installed. Call dit_sparse.remove(transformer) first, then "
                "set the new SparseProcessor (or apply the new plan with dit_sparse.apply(transformer, plan))")
        if any(m.processor is previous for m in attention_modules(transformer).values()):
            raise AlreadyAppliedError(f"{name} already runs another dit-sparse plan in some of its attention modules; "
                                      "call dit_sparse.remove(transformer) first")
        if state is not None:
            previous.unbind(transformer)
        else:
            _hook_registry(transformer).remove_hook(_CONTEXT_HOOK, recurse=False)

    def check_plan(self, transformer: torch.nn.Module, adapter: ModelAdapter | None = None) -> None:
        adapter = adapter or adapter_for_transformer(transformer)
        model = adapter.fingerprint(transformer)
        mismatch = self.plan.model.mismatch(model)
        if mismatch:
            raise PlanMismatchError(f"this plan was made for another model ({mismatch})")
        known = {name for name, _ in adapter.covered_modules(transformer)}
        unknown = sorted(set(self.plan.modules) - known)
        if unknown:
            raise PlanMismatchError(
                f"plan names modules that {type(transformer).__name__} does not have as covered self-attention: "
                f"{', '.join(unknown[:5])}"
            )

    def bind_scheduler(self, transformer: torch.nn.Module, scheduler) -> None:
        """Let step indices come from the pipeline's scheduler (its `timesteps` after set_timesteps)."""
        self._states[id(transformer)].steps.scheduler_ref = weakref.ref(scheduler)

    def unbind(self, transformer: torch.nn.Module) -> dict[str, Any]:
        """Remove hooks; return the processors to restore (the originals, or fresh stock ones)."""
        state = self._states.pop(id(transformer))
        for handle in state.handles:
            handle.remove()
        _hook_registry(transformer).remove_hook(_CONTEXT_HOOK, recurse=False)
        for module in attention_modules(transformer).values():
            if getattr(module, _BINDING, None) is not None and module.__dict__[_BINDING].owner is self:
                del module.__dict__[_BINDING]
        if state.originals is not None:
            return state.originals
        modules = attention_modules(transformer)
        return {b.name: b.stock for module_id, b in state.bindings.items() if b.name in modules}

    def _make_pre_hook(self, state: _TransformerState):
        # The host's part of a forward: what step and branch this is, what runs dense, which kept state is used.
        # Kept out of torch.compile's graphs, so that they hold tensor work only (no guard on a step number).
        @torch.compiler.disable
        def pre_hook(module, args, kwargs):
            self._capture(state, module, args, kwargs)

        return pre_hook

    def _capture(self, state: _TransformerState, transformer, args, kwargs) -> None:
        bound = self._bind_arguments(state.adapter, transformer, args, kwargs)
        grid = state.adapter.grid(transformer, bound)
        state.grid = state.grid if grid == state.grid else grid  # the same object: compiled graphs guard on it
        context = state.context_hook.state._context if state.context_hook else None
        noise = state.adapter.noise_level(state.adapter.timestep(bound))
        state.position = state.steps.update(noise, context, state.adapter)
        state.branch = context.name if context is not None else UNNAMED_BRANCH
        self._name_the_first_branch(state, noise)
        if state.position.new_generation:
            state.cache.clear()  # a new generation: layouts and re-scale statistics must not carry over
        self._check_steps_known(state, transformer)
        self._find_parallelism(state, transformer)
        text = bound.arguments.get("encoder_hidden_states")
        state.text_length = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else None
        self._decide(state, bound.arguments["hidden_states"])

    def _find_parallelism(self, state: _TransformerState, transformer) -> None:
        """This rank's place in the context-parallel mesh, if enable_parallelism was called (either before the plan
        was applied, when the model holds the config, or after, when diffusers gave it to this processor). Refused
        here, before any attention runs, when dit-sparse cannot run the plan under it."""
        config = context_parallel_config(transformer, self)
        if config is None:
            state.parallel_config = state.parallel = None
            return
        if state.parallel_config is not config:
            context_parallel_plan(transformer)  # refuses the families dit-sparse cannot run in parallel, by name
            state.parallel = sequence_parallel(config.context_parallel_config, self.plan.model.num_heads,
                                               type(transformer).__name__)
            state.parallel_config = config

    def _decide(self, state: _TransformerState, hidden_states: torch.Tensor) -> None:
        """This forward's site of every covered module, with its decisions made and its layouts built."""
        device, batch = hidden_states.device, hidden_states.shape[0]
        executor = get_executor(self.executor_name, device)
        for binding in state.bindings.values():
            if binding.covered:
                binding.site = self._site(state, binding, executor, device)
                decide_module(binding.site, batch, binding.saw_text, device, hidden_states.dtype)

    @staticmethod
    def _bind_arguments(adapter: ModelAdapter, transformer, args, kwargs) -> inspect.BoundArguments:
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

    @staticmethod
    def _name_the_first_branch(state: _TransformerState, noise: float | None) -> None:
        """The one-line form binds during its first call, after the pipeline set that call's cache context, so the
        first call's CFG branch has no name and its cache entries are kept under UNNAMED_BRANCH. At the next step,
        whose first call is the same branch (pipelines call their branches in a fixed order), they take its name:
        from then on the caches are exactly those `apply` keeps."""
        if state.originals is not None:
            return  # bound by apply: its context hook received every call's context
        if state.branch == UNNAMED_BRANCH:
            if state.unnamed_step is None and state.position.step == 0:
                state.unnamed_step = noise
            return
        if state.unnamed_step is None or noise == state.unnamed_step:
            return
        for key in [key for key in state.cache if isinstance(key, tuple) and key[-1] == UNNAMED_BRANCH]:
            state.cache[key[:-1] + (state.branch,)] = state.cache.pop(key)
        for entry in state.cache.values():
            if isinstance(entry, dict) and isinstance(entry.get("first"), dict) \
                    and entry["first"].get("branch") == UNNAMED_BRANCH:
                entry["first"]["branch"] = state.branch
        state.unnamed_step = None

    def _check_steps_known(self, state: _TransformerState, transformer) -> None:
        """Refuse, before any attention of this forward runs, a plan whose schedule this form cannot follow:
        running it anyway would make another video than the one the plan was measured with."""
        schedule, position = self.plan.schedule, state.position
        name = type(transformer).__name__
        if schedule.counts_steps and (position.index is None or position.total is None):
            why = ("the one-line form binds during the first call and cannot see that call's step count"
                   if state.originals is None else
                   "its pipeline passes no step count in its cache context, and no scheduler is bound")
            raise UnknownStepError(
                f"the plan's dense steps are counted in steps ({schedule.dense_steps_text()}), and nothing tells "
                f"{name} where this step is: {why}. Apply the plan to the pipeline with dit_sparse.apply(pipe, plan), "
                "which reads the scheduler, or give the plan its dense steps in noise levels, which every form sees: "
                "plan = dit_sparse.in_noise_units(plan, pipe, num_inference_steps)")
        needs = ("dense steps in noise levels" if schedule.uses_noise_levels else
                 "heads that keep state from step to step (reuse, re-scaled or dynamic)"
                 if self.plan.keeps_state_across_steps else None)
        if needs and position.noise is None:
            raise UnknownStepError(
                f"the plan has {needs}, but {name}.forward gave no timestep the processor could read, so it cannot "
                "tell denoising steps apart: pass `timestep` to the transformer by name or in its usual position (a "
                "subclass must keep its parent's forward signature)")

    def _bind_lazily(self, attn: torch.nn.Module) -> _TransformerState:
        """One-line form: find the transformer whose forward is running this module, bind, capture its inputs.

        The inputs are those of the outermost call of that transformer on the stack (torch's Module.__call__): wrappers
        below it (diffusers' hooks, PEFT's scale wrapper) may hold them already split for context parallelism."""
        frame, model, found = sys._getframe(1), None, None
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and any(m is attn for m in owner.modules()):
                owner = model = unwrap_compiled(owner)  # model: the outermost module running this one
            else:
                owner = None
            if (
                owner is not None
                and has_adapter(owner)
                and (found is None or owner is found[0])
                and "args" in frame.f_locals
                and "kwargs" in frame.f_locals
            ):
                found = (owner, frame.f_locals["args"], frame.f_locals["kwargs"])
            frame = frame.f_back
        if found is not None:
            owner, args, kwargs = found
            self.bind(owner)
            state = self._states[id(owner)]
            self._capture(state, owner, args, kwargs)
            return state
        if model is not None:
            raise UnsupportedModelError(
                f"a SparseProcessor is set on {type(model).__name__}, which dit-sparse has no adapter for (supported "
                f"transformers: {', '.join(supported_transformers())}); call dit_sparse.remove(model) to restore its "
                "stock attention processors")
        raise RuntimeError(
            f"SparseProcessor was called by a {type(attn).__name__} outside any supported transformer's forward. "
            f"Use dit_sparse.apply(transformer, plan) to bind it eagerly; supported transformers: "
            f"{', '.join(sorted(ADAPTERS))}"
        )

    # -- the processor call ----------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *,
                 image_rotary_emb=None, **kwargs):
        binding = getattr(attn, _BINDING, None)
        if binding is None or binding.owner is not self:
            binding = self._bind_lazily(attn).bindings[id(attn)]
        state = binding.state
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        if not binding.covered:
            return self._run_uncovered(binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary,
                                       kwargs)
        site = binding.site
        if site is None:
            raise RuntimeError("no grid captured: the transformer's forward pre-hook did not run")
        # Sharing between CFG branches needs an output that depends on nothing but these; calibration observes every
        # call, and training needs each branch's own graph (a shared output is a detached copy). It compares inputs
        # on the host, so it is left out of compiled graphs, and out of calls outside any cache context (no second
        # branch to share with; the one-line form's first call has one, unseen).
        # Under context parallelism every rank must take the same branch (collectives follow), so it is off there.
        parallel = state.parallel
        shares = encoder_hidden_states is None and attention_mask is None and not kwargs and not self.observers \
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and (state.branch != UNNAMED_BRANCH or state.originals is None) and parallel is None
        if shares:
            shared = shared_output(site, hidden_states, rotary)
            if shared is not None:
                return shared  # the other branch of this step had the same input
        reused = reused_module_output(site)
        if reused is not None:
            if shares:
                keep_for_other_branch(site, hidden_states, rotary, reused)
            return reused  # nothing of the module runs between refreshes

        def bound_attend(q, k, v, text=None):
            for observe in self.observers:
                observe(site, q, k, v, text)
            if parallel is not None:
                return parallel_attend(q, k, v, site, text, parallel, binding.head_order, state.text_length)
            return attend(q, k, v, site, text)

        # Where text and image arrive as one sequence (Flux single blocks), the adapter needs the image token count
        # of the sequence it holds (this rank's shard under context parallelism).
        bound_attend.grid = site.grid
        bound_attend.video_tokens = site.grid.num_tokens if parallel is None else \
            parallel.shard_lengths(site.grid.num_tokens)[parallel.shard]
        out = state.adapter.attention(bound_attend, attn, hidden_states, encoder_hidden_states, attention_mask,
                                      rotary, **kwargs)
        binding.saw_text = site.saw_text
        if isinstance(out, torch.Tensor):
            keep_module_output(site, out)
            if shares:
                keep_for_other_branch(site, hidden_states, rotary, out)
        return out

    def _run_uncovered(self, binding: _Binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary,
                       kwargs):
        """A module the plan does not cover: the family's processor; under context parallelism with diffusers'
        parallel attention for self-attention. Cross-attention to a text the cp_plan split gets the whole text (and
        mask) instead, and attends locally."""
        state = binding.state
        if state.parallel_config is None or not hasattr(binding.stock, "_parallel_config"):
            return self._pass_through(binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary,
                                      kwargs)
        total = state.text_length
        split_text = encoder_hidden_states is not None and total is not None \
            and encoder_hidden_states.shape[1] == state.parallel.shard_lengths(total)[state.parallel.shard] < total
        binding.stock._parallel_config = None if split_text else state.parallel_config
        if split_text:
            encoder_hidden_states = gather_split_text(encoder_hidden_states, 1, state.parallel, total)
            if attention_mask is not None:
                attention_mask = gather_split_text(attention_mask, attention_mask.dim() - 1, state.parallel, total)
        return self._pass_through(binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, kwargs)

    @staticmethod
    def _pass_through(binding: _Binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, kwargs):
        params, stock = binding.stock_arguments, binding.stock
        extra = {k: v for k, v in kwargs.items() if k in params}
        for name in ("rotary_emb", "image_rotary_emb"):
            if name in params and rotary is not None:
                extra[name] = rotary
                break
        return stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     **extra)

    def _site(self, state: _TransformerState, binding: _Binding, executor, device) -> AttentionSite:
        if state.grid is None:
            raise RuntimeError("no grid captured: the transformer's forward pre-hook did not run")
        head_dim = self.plan.model.head_dim
        block_q, block_k = self.block_size or executor.block_sizes(device, head_dim)
        module_heads = heads = self.plan.heads_for(binding.name)
        binding.head_order = None
        if state.parallel is not None and state.parallel.ulysses_size > 1:
            # Ulysses: this rank attends over some heads only, those of its slice of the (balanced) head order.
            binding.head_order = self._head_order(module_heads, state, block_q, block_k, device)
            order = binding.head_order or range(len(heads))
            heads = tuple(module_heads[i] for i in order)[state.parallel.heads(len(heads))]
        if heads not in self._programs:
            self._programs[heads] = HeadProgram.of(heads)
        return AttentionSite(
            module_name=binding.name,
            heads=heads,
            grid=state.grid,
            step=state.position.step,
            dense_now=self._dense_now(state, binding.layer),
            refresh_interval=self.plan.schedule.refresh_interval,
            branch=state.branch,
            executor=executor,
            block_q=block_q,
            block_k=block_k,
            cache=state.cache,
            static_layouts=self._static_layouts,
            stats=self.stats,
            # Whether the whole module is reused is decided on all of its heads: under Ulysses every rank must take
            # the module's all-to-alls, or none.
            module_reuse=whole_module_reuse(module_heads) if binding.output_follows_attention else None,
            program=self._programs[heads],
            row_share=self._row_share(state),
        )

    @staticmethod
    def _row_share(state: _TransformerState) -> float:
        """The share of the query rows this rank computes: all of them, but under ring parallelism its shard's."""
        parallel, tokens = state.parallel, state.grid.num_tokens
        if parallel is None or parallel.ring_size == 1:
            return 1.0
        return parallel.ring_lengths(tokens)[parallel.ring_rank] / tokens

    def _head_order(self, heads, state: _TransformerState, block_q: int, block_k: int, device):
        """The head order that evens the Ulysses ranks' work for this module's heads at this grid (None: the
        model's own order is as even, or balancing is off). Memoised."""
        if not self.balance_heads:
            return None
        key = (heads, state.grid, block_q, block_k, state.parallel.ulysses_size)
        if key not in self._head_orders:
            def density(spec):
                return static_layout_at(spec, state.grid, block_q, block_k, self._static_layouts, device).density()

            costs = [head_cost(spec, density, self.plan.schedule.refresh_interval) for spec in heads]
            order = balanced_order(costs, state.parallel.ulysses_size)
            self._head_orders[key] = None if order == tuple(range(len(heads))) else order
        return self._head_orders[key]

    def _dense_now(self, state: _TransformerState, layer: int) -> bool:
        """Whether this layer runs dense at this step (`_check_steps_known` made sure the schedule can say)."""
        schedule, position = self.plan.schedule, state.position
        if layer in schedule.dense_layers:
            return True
        if schedule.uses_noise_levels:
            return schedule.dense_at_noise(position.noise)
        if schedule.counts_steps:
            return schedule.dense_at_step(position.index, position.total)
        return False

    def reset_caches(self) -> None:
        for state in self._states.values():
            state.cache.clear()
        self.stats.reset()

    def bound_transformers(self) -> list[torch.nn.Module]:
        return [s.transformer_ref() for s in self._states.values() if s.transformer_ref() is not None]

    def grid_of(self, transformer: torch.nn.Module) -> Grid | None:
        state = self._states.get(id(transformer))
        return state.grid if state else None
