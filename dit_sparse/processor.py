"""SparseProcessor: the attention processor that executes a SparsePlan inside a diffusers transformer.

diffusers puts one processor object on every attention module and never says which module is which, so the
processor binds itself to the transformer that owns a module (binding.py): eagerly in `apply`, or in the one-line
form (`transformer.set_attn_processor(SparseProcessor(plan))`) at its first call, which finds the transformer on the
stack of running module calls (call_watch.py, which says what that first call costs). Bound, the transformer's
forward pre-hook captures each call's grid, timestep and text, and builds every covered module's site (site_builder.py)
with this step's decisions made; the processor then runs the family's adapter around `attend`. Modules the plan does
not cover run the family's own processor.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any

import torch

from .adapters import (
    ADAPTERS,
    ModelAdapter,
    UnsupportedModelError,
    adapter_for_transformer,
    has_adapter,
    supported_transformers,
)
from .adapters.base import TokenLayout
from .attend import attend
from .binding import (
    BINDING,
    CONTEXT_HOOK,
    UNNAMED_BRANCH,
    Binding,
    TransformerState,
    attention_modules,
    bound_processor,
    context_hook,
    forward_arguments,
    hook_registry,
    set_module_processor,
    unwrap_compiled,
)
from .branch_share import keep_for_other_branch, shared_output
from .call_watch import WATCH, containing
from .decide import keep_module_output, reused_module_output
from .executors import known_executor
from .layout import Grid
from .parallel.attention import gather_split_text, parallel_attend
from .parallel.plans import context_parallel_plan
from .parallel.topology import context_parallel_config, sequence_parallel
from .plan import SparsePlan
from .site import AttentionStats
from .site_builder import SiteBuilder
from .steps import UnknownStepError, check_steps_known, dense_now

logger = logging.getLogger(__name__)

# Imported from here by callers that predate binding.py and steps.py.
__all__ = ["AlreadyAppliedError", "PlanMismatchError", "SparseProcessor", "UnknownStepError", "attention_modules",
           "bound_processor", "set_module_processor", "unwrap_compiled"]


class PlanMismatchError(ValueError):
    pass


class AlreadyAppliedError(RuntimeError):
    pass


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
        self._states: dict[int, TransformerState] = {}
        self._sites = SiteBuilder(plan, block_size, balance_heads, self.stats)
        # Called as observer(site, q, k, v, text) before every covered attention; calibration records through it.
        self.observers: list = []
        if executor is not None:
            known_executor(executor)  # fail early on an unknown name (the device is known at the first call)
        _uncompiled_binding()
        WATCH.watch(self)  # until it binds: the one-line form binds at its first call

    def __setstate__(self, state):
        self.__dict__.update(state)
        _uncompiled_binding()
        if not self._states:  # a copy of an unbound processor binds at its first call too
            WATCH.watch(self)

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
            bindings[id(module)] = Binding(name, covered.get(name, -1), name in covered, stock,
                                           frozenset(inspect.signature(stock.__call__).parameters),
                                           adapter.output_follows_attention(module))
        state = TransformerState(weakref.ref(transformer), adapter, bindings, originals)
        for module in attention_modules(transformer).values():
            binding = bindings[id(module)]
            binding.owner, binding.state = self, state
            setattr(module, BINDING, binding)
        state.handles.append(transformer.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True))
        hook = context_hook(self)
        hook_registry(transformer).register_hook(hook, CONTEXT_HOOK)
        state.context_hook = hook
        self._states[id(transformer)] = state
        WATCH.release(self)

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
            hook_registry(transformer).remove_hook(CONTEXT_HOOK, recurse=False)

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
        hook_registry(transformer).remove_hook(CONTEXT_HOOK, recurse=False)
        for module in attention_modules(transformer).values():
            if getattr(module, BINDING, None) is not None and module.__dict__[BINDING].owner is self:
                del module.__dict__[BINDING]
        if state.originals is not None:
            return state.originals
        modules = attention_modules(transformer)
        return {b.name: b.stock for module_id, b in state.bindings.items() if b.name in modules}

    def _bind_at_first_call(self, attn: torch.nn.Module) -> Binding:  # kept out of compiled graphs: _uncompiled_binding
        """The one-line form: bind to the transformer running `attn`, the innermost supported one on the stack of
        running calls, and have its outermost call run again once it returns (call_watch.py)."""
        running = containing(WATCH.running(), attn)
        owners = [m for m in running if has_adapter(unwrap_compiled(m))]
        if not owners:
            if running:
                raise UnsupportedModelError(
                    f"a SparseProcessor is set on {type(unwrap_compiled(running[0])).__name__}, which dit-sparse has "
                    f"no adapter for (supported transformers: {', '.join(supported_transformers())}); call "
                    "dit_sparse.remove(model) to restore its stock attention processors")
            raise RuntimeError(
                f"SparseProcessor was called by a {type(attn).__name__} outside any supported transformer's forward "
                "(or one whose start it did not see). Use dit_sparse.apply(transformer, plan) to bind it eagerly; "
                f"supported transformers: {', '.join(sorted(ADAPTERS))}")
        transformer = unwrap_compiled(owners[-1])
        if id(transformer) not in self._states:
            self.bind(transformer)
            state = self._states[id(transformer)]
            state.first_call_pending = True
            self._run_again_after(next(m for m in running if unwrap_compiled(m) is transformer), transformer, state)
        return self._states[id(transformer)].bindings[id(attn)]

    def _run_again_after(self, caller: torch.nn.Module, transformer, state: TransformerState) -> None:
        """When the running call of `caller` (the transformer, or what wraps it) returns, run it again, bound, and
        return that output instead. Captured here, as `caller` received it: the transformer's own pre-hook may not
        see the call (a wrapper may call its forward)."""
        def run_again(module, args, kwargs, output):
            handle.remove()
            if output is None or not state.first_call_pending:  # the call raised: torch calls this hook all the same
                state.first_call_pending = False
                return None
            state.first_call_pending = False
            self._capture(state, transformer, args, kwargs)
            state.capture_armed = False
            try:
                return module(*args, **kwargs)
            finally:
                state.capture_armed = True

        handle = caller.register_forward_hook(run_again, with_kwargs=True, always_call=True)
        state.handles.append(handle)

    def _make_pre_hook(self, state: TransformerState):
        # The host's part of a forward: what step and branch this is, what runs dense, which kept state is used.
        # Kept out of torch.compile's graphs, so that they hold tensor work only (no guard on a step number).
        @torch.compiler.disable
        def pre_hook(module, args, kwargs):
            if state.capture_armed:
                self._capture(state, module, args, kwargs)

        return pre_hook

    def _capture(self, state: TransformerState, transformer, args, kwargs) -> None:
        adapter = state.adapter
        bound = forward_arguments(adapter, transformer, args, kwargs)
        grid = adapter.grid(transformer, bound)
        state.grid = state.grid if grid == state.grid else grid  # the same object: compiled graphs guard on it
        context = state.context_hook.state._context if state.context_hook else None
        noise = adapter.noise_level(adapter.timestep(bound))
        state.position = state.steps.update(noise, context, adapter)
        state.branch = context.name if context is not None else UNNAMED_BRANCH
        self._name_the_first_branch(state, noise)
        if state.position.new_generation:
            state.generation.clear()  # a new generation: layouts and re-scale statistics must not carry over
        check_steps_known(self.plan.schedule, self.plan.keeps_state_across_steps, state.position,
                          type(transformer).__name__, one_line_form=state.originals is None)
        self._find_parallelism(state, transformer)
        text = bound.arguments.get("encoder_hidden_states")
        state.text_length = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else None
        parallel = state.parallel
        tokens = TokenLayout(state.grid, state.grid.num_tokens if parallel is None else
                             parallel.shard_lengths(state.grid.num_tokens)[parallel.shard])
        state.tokens = state.tokens if tokens == state.tokens else tokens  # the same object, as the grid
        self._sites.build(state, bound.arguments["hidden_states"], self.executor_name, self._dense_now)

    def _find_parallelism(self, state: TransformerState, transformer) -> None:
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

    @staticmethod
    def _name_the_first_branch(state: TransformerState, noise: float | None) -> None:
        """The one-line form binds during its first call, after the pipeline set that call's cache context, so the
        first call's CFG branch has no name and its state is kept under UNNAMED_BRANCH. At the next step, whose
        first call is the same branch (pipelines call their branches in a fixed order), it takes its name: from then
        on the state is exactly what `apply` keeps."""
        if state.originals is not None:
            return  # bound by apply: its context hook received every call's context
        if state.branch == UNNAMED_BRANCH:
            if state.unnamed_step is None and state.position.step == 0:
                state.unnamed_step = noise
            return
        if state.unnamed_step is None or noise == state.unnamed_step:
            return
        state.generation.rename_branch(UNNAMED_BRANCH, state.branch)
        state.unnamed_step = None

    def _dense_now(self, state: TransformerState, layer: int) -> bool:
        """Whether this layer runs dense at this step (`check_steps_known` made sure the schedule can say)."""
        return dense_now(self.plan.schedule, state.position, layer)

    # -- the processor call ----------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *,
                 image_rotary_emb=None, **kwargs):
        binding = getattr(attn, BINDING, None)
        if binding is None or binding.owner is not self:
            binding = self._bind_at_first_call(attn)
        state = binding.state
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        if state.first_call_pending:  # its output is discarded: the call runs again, bound (call_watch.py)
            return self._pass_through(binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary,
                                      kwargs)
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
        tokens = state.tokens
        sees_text = binding.sees_text = state.adapter.sees_text(tokens, hidden_states, encoder_hidden_states)

        def bound_attend(q, k, v, text=None):
            if (text is not None) != sees_text:
                raise ValueError(f"{binding.name}: {type(state.adapter).__name__}.sees_text is {sees_text}, but its "
                                 f"attention {'did not get' if sees_text else 'got'} text tokens")
            for observe in self.observers:
                observe(site, q, k, v, text)
            if parallel is not None:
                return parallel_attend(q, k, v, site, text, parallel, binding.head_order, state.text_length)
            return attend(q, k, v, site, text)

        out = state.adapter.attention(bound_attend, attn, hidden_states, encoder_hidden_states, attention_mask,
                                      rotary, tokens=tokens, **kwargs)
        if isinstance(out, torch.Tensor):
            keep_module_output(site, out, sees_text)
            if shares:
                keep_for_other_branch(site, hidden_states, rotary, out)
        return out

    def _run_uncovered(self, binding: Binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary,
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
    def _pass_through(binding: Binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, kwargs):
        params, stock = binding.stock_arguments, binding.stock
        extra = {k: v for k, v in kwargs.items() if k in params}
        for name in ("rotary_emb", "image_rotary_emb"):
            if name in params and rotary is not None:
                extra[name] = rotary
                break
        return stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     **extra)

    def reset_caches(self) -> None:
        for state in self._states.values():
            state.generation.clear()
        self.stats.reset()

    def bound_transformers(self) -> list[torch.nn.Module]:
        return [s.transformer_ref() for s in self._states.values() if s.transformer_ref() is not None]

    def grid_of(self, transformer: torch.nn.Module) -> Grid | None:
        state = self._states.get(id(transformer))
        return state.grid if state else None


def _uncompiled_binding() -> None:
    """Keep torch.compile out of the one-line form's first binding (a compiled first call graph-breaks there).
    Applied when the first processor is made, not at import: torch.compiler.disable imports dynamo, and dynamo
    imports triton, which `import dit_sparse` must not."""
    if not getattr(SparseProcessor._bind_at_first_call, "_uncompiled", False):
        disabled = torch.compiler.disable(SparseProcessor._bind_at_first_call)
        disabled._uncompiled = True
        SparseProcessor._bind_at_first_call = disabled
