"""SparseProcessor: the attention processor that executes a SparsePlan inside a diffusers transformer.

diffusers puts one processor object on every attention module and never says which module is which, so the
processor binds itself to the transformer that owns a module: eagerly in `apply`, or lazily on the first call in
the one-line form (`transformer.set_attn_processor(SparseProcessor(plan))`). Binding maps each attention module to
its name and layer, registers a forward pre-hook for the grid and timestep and a stateful diffusers hook that
receives the pipeline's cache context (CFG branch, step index). Modules the plan does not cover run the family's
own processor.
"""

from __future__ import annotations

import inspect
import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import ADAPTERS, ModelAdapter, adapter_for_transformer, has_adapter
from .attend import AttentionSite, AttentionStats, attend, keep_module_output, reused_module_output, whole_module_reuse
from .branch_share import keep_for_other_branch, shared_output
from .executors import get_executor, known_executor
from .layout import Grid
from .plan import SparsePlan

logger = logging.getLogger(__name__)

_CONTEXT_HOOK = "dit_sparse_context"


class PlanMismatchError(ValueError):
    pass


class UnknownStepError(RuntimeError):
    """The plan runs some denoising steps dense, but nothing told the processor which step this call is."""


def _context_hook():
    """A do-nothing stateful diffusers hook: diffusers hands it the pipeline's cache context on every call.

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

    return _ContextHook()


def _hook_registry(transformer):
    from diffusers.hooks.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(transformer)


@dataclass
class StepTracker:
    """Denoising step from the pipeline's cache context when it says, else from the sequence of timesteps.

    Timesteps fall during one generation; a timestep above the last one starts a new generation. Calls with the
    same timestep (CFG branches, a second transformer) share a step: nothing here counts calls.
    """

    timesteps: list[float] = field(default_factory=list)
    scheduler_ref: Any = None

    def update(self, timestep: float | None, context) -> tuple[int | None, int | None]:
        step = getattr(context, "step_index", None)
        total = getattr(context, "num_inference_steps", None)
        if timestep is not None:
            if self.timesteps and timestep > self.timesteps[-1] + 1e-6:
                self.timesteps = []
            if not self.timesteps or abs(timestep - self.timesteps[-1]) > 1e-6:
                self.timesteps.append(timestep)
        scheduler = self.scheduler_ref() if self.scheduler_ref is not None else None
        if (step is None or total is None) and scheduler is not None and timestep is not None:
            known = getattr(scheduler, "timesteps", None)
            if known is not None and len(known):
                diffs = (torch.as_tensor(known, dtype=torch.float64) - timestep).abs()
                if float(diffs.min()) < 1e-3:
                    step = int(diffs.argmin()) if step is None else step
                    total = len(known) if total is None else total
        if step is None and self.timesteps:
            step = len(self.timesteps) - 1
        return step, total


@dataclass
class _Binding:
    name: str
    layer: int
    covered: bool
    stock: Any


@dataclass
class _TransformerState:
    """Everything the processor keeps per bound transformer."""

    transformer_ref: Any
    adapter: ModelAdapter
    bindings: dict[int, _Binding]
    originals: dict[str, Any] | None  # module name -> processor before apply (None in the lazy form)
    steps: StepTracker = field(default_factory=StepTracker)
    grid: Grid | None = None
    timestep: float | None = None
    step: int | None = None
    num_steps: int | None = None
    branch: str = "unknown"
    cache: dict = field(default_factory=dict)
    handles: list = field(default_factory=list)
    context_hook: Any = None


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
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, plan: SparsePlan, executor: str | None = None, block_size: tuple[int, int] | None = None):
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"SparseProcessor needs a SparsePlan, got {type(plan).__name__}")
        if block_size is not None and not (
                isinstance(block_size, (tuple, list)) and len(block_size) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
            raise ValueError(f"block_size must be (block_q, block_k), two positive integers, got {block_size!r}")
        self.plan = plan
        self.executor_name = executor
        self.block_size = block_size
        self.stats = AttentionStats()
        self._states: dict[int, _TransformerState] = {}
        self._module_state: dict[int, _TransformerState] = {}
        self._static_layouts: dict = {}
        # Called as observer(site, q, k, v, text) before every covered attention; calibration records through it.
        self.observers: list = []
        if executor is not None:
            known_executor(executor)  # fail early on an unknown name (the device is known at the first call)

    # -- binding ---------------------------------------------------------------------------------------------
    def bind(self, transformer: torch.nn.Module, originals: dict[str, Any] | None = None) -> None:
        """Map the transformer's attention modules to names and layers and install the context hooks."""
        if id(transformer) in self._states:
            return
        adapter = adapter_for_transformer(transformer)
        self.check_plan(transformer, adapter)
        covered = dict(adapter.covered_modules(transformer))
        bindings = {}
        for name, module in attention_modules(transformer).items():
            stock = originals[name] if originals else adapter.stock_processor(module)
            bindings[id(module)] = _Binding(name, covered.get(name, -1), name in covered, stock)
        state = _TransformerState(weakref.ref(transformer), adapter, bindings, originals)
        state.handles.append(transformer.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True))
        hook = _context_hook()
        _hook_registry(transformer).register_hook(hook, _CONTEXT_HOOK)
        state.context_hook = hook
        self._states[id(transformer)] = state
        for module_id in bindings:
            self._module_state[module_id] = state

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
        for module_id in state.bindings:
            self._module_state.pop(module_id, None)
        if state.originals is not None:
            return state.originals
        modules = attention_modules(transformer)
        return {b.name: b.stock for module_id, b in state.bindings.items() if b.name in modules}

    def _make_pre_hook(self, state: _TransformerState):
        def pre_hook(module, args, kwargs):
            self._capture(state, module, args, kwargs)

        return pre_hook

    def _capture(self, state: _TransformerState, transformer, args, kwargs) -> None:
        bound = inspect.signature(type(transformer).forward).bind_partial(transformer, *args, **kwargs)
        state.grid = state.adapter.grid(transformer, bound)
        state.timestep = state.adapter.timestep(bound)
        context = state.context_hook.state._context if state.context_hook else None
        state.branch = context.name if context is not None else "unknown"
        previous = state.step
        state.step, state.num_steps = state.steps.update(state.timestep, context)
        if previous is not None and state.step is not None and state.step < previous:
            state.cache.clear()  # a new generation: layouts and re-scale statistics must not carry over

    def _bind_lazily(self, attn: torch.nn.Module) -> _TransformerState:
        """One-line form: find the transformer whose forward is running this module, bind, capture its inputs."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if (
                isinstance(owner, torch.nn.Module)
                and has_adapter(owner)
                and "args" in frame.f_locals
                and "kwargs" in frame.f_locals
                and any(m is attn for m in owner.modules())
            ):
                self.bind(owner)
                state = self._states[id(owner)]
                self._capture(state, owner, frame.f_locals["args"], frame.f_locals["kwargs"])
                return state
            frame = frame.f_back
        raise RuntimeError(
            f"SparseProcessor was called by a {type(attn).__name__} outside any supported transformer's forward. "
            f"Use dit_sparse.apply(transformer, plan) to bind it eagerly; supported transformers: "
            f"{', '.join(sorted(ADAPTERS))}"
        )

    # -- the processor call ----------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *,
                 image_rotary_emb=None, **kwargs):
        state = self._module_state.get(id(attn)) or self._bind_lazily(attn)
        binding = state.bindings[id(attn)]
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        if not binding.covered:
            return self._pass_through(binding.stock, attn, hidden_states, encoder_hidden_states, attention_mask,
                                      rotary, kwargs)
        site = self._site(state, binding, attn, hidden_states)
        # Sharing between CFG branches needs an output that depends on nothing but these; calibration observes every
        # call, and training needs each branch's own graph (a shared output is a detached copy).
        shares = encoder_hidden_states is None and attention_mask is None and not kwargs and not self.observers \
            and not torch.is_grad_enabled()
        if shares:
            shared = shared_output(site, hidden_states, rotary)
            if shared is not None:
                return shared  # the other branch of this step had the same input
        reused = reused_module_output(site, hidden_states)
        if reused is not None:
            if shares:
                keep_for_other_branch(site, hidden_states, rotary, reused)
            return reused  # nothing of the module runs between refreshes

        def bound_attend(q, k, v, text=None):
            for observe in self.observers:
                observe(site, q, k, v, text)
            return attend(q, k, v, site, text)

        # Where text and image arrive as one sequence (Flux single blocks), the adapter needs the image token count.
        bound_attend.grid = site.grid
        out = state.adapter.attention(bound_attend, attn, hidden_states, encoder_hidden_states, attention_mask,
                                      rotary, **kwargs)
        if isinstance(out, torch.Tensor):
            keep_module_output(site, hidden_states, out)
            if shares:
                keep_for_other_branch(site, hidden_states, rotary, out)
        return out

    @staticmethod
    def _pass_through(stock, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, kwargs):
        params = inspect.signature(stock.__call__).parameters
        extra = {k: v for k, v in kwargs.items() if k in params}
        for name in ("rotary_emb", "image_rotary_emb"):
            if name in params and rotary is not None:
                extra[name] = rotary
                break
        return stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     **extra)

    def _site(self, state: _TransformerState, binding: _Binding, attn, hidden_states) -> AttentionSite:
        device = hidden_states.device
        executor = get_executor(self.executor_name, device)
        if state.grid is None:
            raise RuntimeError("no grid captured: the transformer's forward pre-hook did not run")
        head_dim = self.plan.model.head_dim
        block_q, block_k = self.block_size or executor.block_sizes(device, head_dim)
        heads = self.plan.heads_for(binding.name)
        return AttentionSite(
            module_name=binding.name,
            heads=heads,
            grid=state.grid,
            step=state.step,
            dense_now=self._dense_now(state, binding.layer),
            refresh_interval=self.plan.schedule.refresh_interval,
            branch=state.branch,
            executor=executor,
            block_q=block_q,
            block_k=block_k,
            cache=state.cache,
            static_layouts=self._static_layouts,
            stats=self.stats,
            module_reuse=whole_module_reuse(heads) if state.adapter.output_follows_attention(attn) else None,
        )

    def _dense_now(self, state: _TransformerState, layer: int) -> bool:
        schedule = self.plan.schedule
        if layer in schedule.dense_layers:
            return True
        step, total = state.step, state.num_steps
        if total is not None and step is not None:
            if step < int(round(schedule.dense_first * total)):
                return True
            return step >= total - schedule.dense_last_steps
        if schedule.dense_first > 0 and state.timestep is not None:
            # No step count known: read the fraction as a fraction of the noise range (timestep / 1000).
            return state.timestep / 1000.0 > 1.0 - schedule.dense_first
        if schedule.dense_first > 0 or schedule.dense_last_steps > 0:
            # Running every step sparse instead would be a silently different video.
            raise UnknownStepError(
                f"the plan runs dense steps (dense_first {schedule.dense_first}, dense_last_steps "
                f"{schedule.dense_last_steps}) but {type(state.transformer_ref()).__name__}.forward gave no timestep "
                "the processor could read: pass `timestep` to the transformer by name or in Wan's position (a "
                "subclass must keep its parent's forward signature), or use a plan with no dense steps")
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
