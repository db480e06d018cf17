"""Per-generation state: what one transformer keeps from one denoising step to the next, typed.

A SparseProcessor keeps one GenerationState per bound transformer; a new generation clears it. It holds, per covered
module, head group and CFG branch (an EntryKey):

- ReuseEntry: a `reuse` group's computed outputs (or a wholly reused module's), reused or forecast between refreshes;
- RescaleEntry: a re-scaled group's statistics from its last refresh;
- LayoutEntry: a dynamic group's layout from its last estimate;
- MergedLayout: the look-up table of a launch whose dynamic members' layouts were stacked along heads;

and per module a BranchShare: what the first CFG branch of a step kept for the second (branch_share.py).

StepDecisions is the other half: this forward's decision on every stateful group of one module, made on the host
before the forward (decide.py) and read by attend, each holding the entry it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch

from .layout import BlockLayout, Grid

WHOLE_MODULE = "module"  # the heads key of a wholly reused module's output
HeadsKey = Union[tuple[int, ...], str]  # a group's heads, ascending, or WHOLE_MODULE


class EntryKey(NamedTuple):
    """Where an entry belongs: the module, its heads, the CFG branch."""

    module: str
    heads: HeadsKey
    branch: str


@dataclass
class Computed:
    """Where an entry's tensors came from: the step they were computed at, and the batch and grid they fit."""

    step: int | None
    batch: int
    grid: Grid

    def fits(self, batch: int, grid: Grid) -> bool:
        return self.batch == batch and self.grid == grid

    def fresh_at(self, step: int | None, batch: int, grid: Grid, refresh_interval: int) -> bool:
        """Usable at the `refresh_interval - 1` steps after the step it was computed at. A second call at that same
        step is another generation (each step calls a module once per branch)."""
        return (step is not None and self.step is not None and self.fits(batch, grid)
                and 0 < step - self.step < refresh_interval)


@dataclass
class RescaleEntry(Computed):
    """The in-layout share of the dense mass (B, G, S) and the residual (B, S, G, D) of the last refresh."""

    ratio: torch.Tensor | None = None
    residual: torch.Tensor | None = None


@dataclass
class LayoutEntry(Computed):
    """A dynamic group's layout, estimated from its q and k at `step`."""

    layout: BlockLayout | None = None


@dataclass
class ReuseEntry:
    """A `reuse` group's (or whole module's) computed outputs, oldest first, at most three, and their steps."""

    batch: int
    grid: Grid
    steps: list[int | None]
    refresh: bool  # the newest was computed at a sparse step (a refresh), not at a dense warm-up step
    outputs: list[torch.Tensor] = field(default_factory=list)

    def keep(self, history: int, out: torch.Tensor) -> None:
        """After the group ran: its output joins the `history` newest kept ones (as decided)."""
        earlier = self.outputs[len(self.outputs) - history:] if history else []
        self.outputs = earlier + [out.detach().clone()]


@dataclass(frozen=True)
class MergedLayout:
    """One look-up table for a launch's heads, stacked from its members' layouts (`parts`, by identity)."""

    parts: tuple[BlockLayout, ...]
    layout: BlockLayout

    def made_of(self, parts) -> bool:
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(self.parts, parts))


@dataclass
class BranchCall:
    """The first call of a step to a module: its input's fingerprint and, for a module whose branches look alike,
    the whole input (and RoPE) and output."""

    step: int
    branch: str
    fingerprint: tuple
    input: torch.Tensor | None = None
    extra: object = None
    output: torch.Tensor | None = None


@dataclass
class BranchShare:
    """Per module: whether its CFG branches differ (never looked at again), look alike, and the last first call."""

    differs: bool = False
    alike: bool = False
    first: BranchCall | None = None


class GenerationState:
    """Everything one transformer keeps across the steps of one generation, by EntryKey (branch sharing by module).

    The dictionaries are for reading; entries change through the methods below.
    """

    def __init__(self):
        self.reuse: dict[EntryKey, ReuseEntry] = {}
        self.rescale: dict[EntryKey, RescaleEntry] = {}
        self.layouts: dict[EntryKey, LayoutEntry] = {}
        self.merged: dict[EntryKey, MergedLayout] = {}
        self.branches: dict[str, BranchShare] = {}

    def _stores(self) -> tuple[dict, ...]:
        return self.reuse, self.rescale, self.layouts, self.merged

    def clear(self) -> None:
        """A new generation: layouts, statistics and outputs of the last one must not carry over."""
        for store in (*self._stores(), self.branches):
            store.clear()

    # -- reuse -------------------------------------------------------------------------------------------------
    def reuse_entry(self, key: EntryKey) -> ReuseEntry | None:
        return self.reuse.get(key)

    def keep_reuse(self, key: EntryKey, entry: ReuseEntry) -> None:
        self.reuse[key] = entry

    def forget_reuse(self, key: EntryKey) -> None:
        self.reuse.pop(key, None)

    # -- re-scaled and dynamic groups ----------------------------------------------------------------------------
    def rescale_entry(self, key: EntryKey) -> RescaleEntry | None:
        return self.rescale.get(key)

    def new_rescale(self, key: EntryKey, step: int | None, batch: int, grid: Grid) -> RescaleEntry:
        """An empty entry for statistics computed now (the refresh fills it in)."""
        entry = self.rescale[key] = RescaleEntry(step, batch, grid)
        return entry

    def layout_entry(self, key: EntryKey) -> LayoutEntry | None:
        return self.layouts.get(key)

    def new_layout(self, key: EntryKey, step: int | None, batch: int, grid: Grid) -> LayoutEntry:
        """An empty entry for a layout estimated now."""
        entry = self.layouts[key] = LayoutEntry(step, batch, grid)
        return entry

    def merged_layout(self, key: EntryKey, parts) -> BlockLayout | None:
        """The launch's kept table, if it was stacked from these very `parts`."""
        kept = self.merged.get(key)
        return kept.layout if kept is not None and kept.made_of(parts) else None

    def keep_merged(self, key: EntryKey, parts, layout: BlockLayout) -> None:
        self.merged[key] = MergedLayout(tuple(parts), layout)

    # -- CFG branches --------------------------------------------------------------------------------------------
    def branch_share(self, module: str) -> BranchShare:
        return self.branches.setdefault(module, BranchShare())

    def rename_branch(self, old: str, new: str) -> None:
        """Entries kept under branch `old` belong to `new` (the one-line form learns its first branch's name late)."""
        for store in self._stores():
            for key in [key for key in store if key.branch == old]:
                store[key._replace(branch=new)] = store.pop(key)
        for share in self.branches.values():
            if share.first is not None and share.first.branch == old:
                share.first.branch = new


@dataclass(frozen=True)
class ReuseDecision:
    """reuse: nothing runs, the kept outputs stand in (weights None: the newest as it is; else their weighted sum,
    oldest first). Otherwise the group runs and keeps its output beside the `history` newest kept ones (keep
    False: it keeps nothing)."""

    reuse: bool
    weights: torch.Tensor | None = None
    keep: bool = True
    history: int = 0


@dataclass(frozen=True)
class ReuseStep:
    """This step's decision for one `reuse` group (or whole module), and the entry it is about."""

    decision: ReuseDecision | None = None
    entry: ReuseEntry | None = None

    def keep(self, out: torch.Tensor) -> None:
        """After the group ran: keep `out` where this step decided to."""
        if self.decision is not None and not self.decision.reuse and self.decision.keep:
            self.entry.keep(self.decision.history, out)


NOT_DECIDED = ReuseStep()


@dataclass(frozen=True)
class RefreshStep:
    """This step's choice for a re-scaled or dynamic group: `kept` uses what the entry holds (statistics, layout);
    otherwise it is refreshed now, into the entry."""

    kept: bool
    entry: RescaleEntry | LayoutEntry


@dataclass
class StepDecisions:
    """This forward's decisions on one module's stateful groups, keyed by heads only: a compiled graph looks them up
    with the same keys in every layer, so repeated blocks share it."""

    reuse: dict[HeadsKey, ReuseStep] = field(default_factory=dict)
    rescale: dict[tuple[int, ...], RefreshStep] = field(default_factory=dict)
    layouts: dict[tuple[int, ...], RefreshStep] = field(default_factory=dict)

    def reuse_step(self, heads: HeadsKey) -> ReuseStep:
        return self.reuse.get(heads, NOT_DECIDED)
