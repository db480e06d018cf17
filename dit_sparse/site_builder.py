"""Each forward's AttentionSite for every covered module of a bound transformer: its heads (under Ulysses, this
rank's, in the order that evens the ranks' work), blocks, step and state, with this step's decisions made."""

from __future__ import annotations

from typing import Callable

from .binding import Binding, TransformerState
from .decide import decide_module, whole_module_reuse
from .executors import get_executor
from .head_layouts import static_layout_at
from .parallel.balance import balanced_order, head_cost
from .plan import SparsePlan
from .program import HeadProgram
from .site import AttentionSite, AttentionStats


class SiteBuilder:
    """Makes the sites of a processor's plan; what it builds once (head programs, Ulysses head orders, static
    layouts) it keeps for every forward and every transformer the processor is bound to."""

    def __init__(self, plan: SparsePlan, block_size: tuple[int, int] | None, balance_heads: bool,
                 stats: AttentionStats):
        self.plan = plan
        self.block_size = block_size
        self.balance_heads = balance_heads
        self.stats = stats
        self.static_layouts: dict = {}
        # How each distinct head mix runs, made once: its head indices live on the device from the first forward on.
        self._programs: dict[tuple, HeadProgram] = {}
        self._head_orders: dict[tuple, tuple[int, ...] | None] = {}  # Ulysses head orders, per heads and grid

    def build(self, state: TransformerState, hidden_states, executor_name: str | None,
              dense_now: Callable[[TransformerState, int], bool]) -> None:
        """This forward's site of every covered module, with its decisions made and its layouts built.
        dense_now(state, layer): whether the layer runs dense at this step."""
        device, batch = hidden_states.device, hidden_states.shape[0]
        executor = get_executor(executor_name, device)
        for binding in state.bindings.values():
            if binding.covered:
                binding.site = self._site(state, binding, executor, device, dense_now(state, binding.layer))
                decide_module(binding.site, batch, binding.sees_text, device, hidden_states.dtype)

    def _site(self, state: TransformerState, binding: Binding, executor, device, dense: bool) -> AttentionSite:
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
            dense_now=dense,
            refresh_interval=self.plan.schedule.refresh_interval,
            branch=state.branch,
            executor=executor,
            block_q=block_q,
            block_k=block_k,
            state=state.generation,
            static_layouts=self.static_layouts,
            stats=self.stats,
            # Whether the whole module is reused is decided on all of its heads: under Ulysses every rank must take
            # the module's all-to-alls, or none.
            module_reuse=whole_module_reuse(module_heads) if binding.output_follows_attention else None,
            program=self._programs[heads],
            row_share=self._row_share(state),
        )

    @staticmethod
    def _row_share(state: TransformerState) -> float:
        """The share of the query rows this rank computes: all of them, but under ring parallelism its shard's."""
        parallel, tokens = state.parallel, state.grid.num_tokens
        if parallel is None or parallel.ring_size == 1:
            return 1.0
        return parallel.ring_lengths(tokens)[parallel.ring_rank] / tokens

    def _head_order(self, heads, state: TransformerState, block_q: int, block_k: int, device):
        """The head order that evens the Ulysses ranks' work for this module's heads at this grid (None: the
        model's own order is as even, or balancing is off). Memoised."""
        if not self.balance_heads:
            return None
        key = (heads, state.grid, block_q, block_k, state.parallel.ulysses_size)
        if key not in self._head_orders:
            def density(spec):
                return static_layout_at(spec, state.grid, block_q, block_k, self.static_layouts, device).density()

            costs = [head_cost(spec, density, self.plan.schedule.refresh_interval) for spec in heads]
            order = balanced_order(costs, state.parallel.ulysses_size)
            self._head_orders[key] = None if order == tuple(range(len(heads))) else order
        return self._head_orders[key]
