"""Where `attend` runs: the module, its heads' plan, grid, step and state (AttentionSite), the text tokens of a joint
sequence (TextTokens), and the counters of what ran (AttentionStats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .executors import Executor
from .layout import Grid
from .parallel.ring import QueryRows
from .plan import HeadStrategy
from .program import HeadProgram
from .state import EntryKey, GenerationState, HeadsKey, StepDecisions


class AttentionStats:
    """Counts attention calls and query-key pairs: what dense attention would compute and what was computed (pooled
    keys once). The counters are CPU tensors, added to in place: a compiled graph updates them without reading
    them (a Python number would be read, and guarded on, at every call); reading them here needs no device."""

    def __init__(self):
        self._counts = torch.zeros(3, dtype=torch.float64)  # calls, dense pairs, computed pairs

    def called(self) -> None:
        self._counts[0] += 1

    def add(self, dense: float, computed: float) -> None:
        self._counts[1] += dense
        self._counts[2] += computed

    @property
    def calls(self) -> int:
        return int(self._counts[0])

    @property
    def dense_pairs(self) -> float:
        return float(self._counts[1])

    @property
    def computed_pairs(self) -> float:
        return float(self._counts[2])

    @property
    def executed_density(self) -> float:
        return self.computed_pairs / self.dense_pairs if self.dense_pairs else 1.0

    def reset(self) -> None:
        self._counts.zero_()

    def summed_over_ranks(self) -> "AttentionStats":
        """Under context parallelism each rank counts its own heads and query rows: the whole model's counts are
        their sum over every rank (a collective: every rank must call it). Itself without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = self._counts.clone()
        if "nccl" in str(dist.get_backend()):
            counts = counts.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL reduces device tensors only
        dist.all_reduce(counts)
        total = AttentionStats()
        total._counts = counts.cpu()
        total._counts[0] = self._counts[0]  # calls: this rank's, which every rank makes alike
        return total


@dataclass(frozen=True)
class TextTokens:
    """Where the text tokens of a joint sequence sit. mask: (B, length) True for real (unpadded) tokens."""

    length: int
    first: bool
    mask: torch.Tensor | None = None

    def slices(self, seq_len: int) -> tuple[slice, slice]:
        """(video slice, text slice) of the joint sequence."""
        if self.first:
            return slice(self.length, seq_len), slice(0, self.length)
        return slice(0, seq_len - self.length), slice(seq_len - self.length, seq_len)

    def key_mask(self, batch: int, seq_len: int, device) -> torch.Tensor | None:
        """(B, S) key mask over the joint sequence, or None when no text token is padded. Whether any is, is read
        only from a mask on the CPU: on a GPU that read would wait for the device, and inside a compiled graph it
        would break it, so there a given mask is always applied (the same output)."""
        if self.mask is None:
            return None
        if self.mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(self.mask.all()):
            return None
        full = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        full[:, self.slices(seq_len)[1]] = self.mask.bool()
        return full


@dataclass
class AttentionSite:
    """Everything attend needs about where it runs: module, heads' plan, grid, step, state across steps.

    state: the transformer's GenerationState (sites of one generation share it).
    """

    module_name: str
    heads: tuple[HeadStrategy, ...]
    grid: Grid
    step: int | None
    dense_now: bool
    refresh_interval: int
    branch: str
    executor: Executor
    block_q: int
    block_k: int
    state: GenerationState
    static_layouts: dict[Any, Any]  # built once per grid and block size, for every generation (head_layouts.py)
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Set by the processor to the one `reuse` strategy of a module whose heads all reuse alike: then, if its
    # attention sees no text tokens, the processor keeps the module's whole output and attend keeps nothing per head.
    module_reuse: HeadStrategy | None = None
    # This step's decisions on the stateful heads (`decide_module`, on the host before the forward runs); attend
    # makes them itself when it is called without them.
    decisions: StepDecisions | None = None
    program: HeadProgram | None = None
    # Under ring parallelism, the rows of q whose outputs this rank keeps (the rest is filler): attend computes
    # only those. None: every row.
    query_rows: QueryRows | None = None
    row_share: float = 1.0  # the share of the query rows this rank computes (ring parallelism), for the counters

    def key(self, heads: HeadsKey) -> EntryKey:
        """Where this module's state for `heads` (WHOLE_MODULE: its whole output) is kept, in this branch."""
        return EntryKey(self.module_name, heads, self.branch)
