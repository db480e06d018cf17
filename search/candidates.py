"""The strategies the search tries for every head, and their layouts at the executor's block sizes.

A candidate is one HeadStrategy shared by every head, or a template resolved per head at calibration
(``vertical_stripe`` with the key columns that carried the most attention mass for that head). Static candidates
whose layouts coincide at the executor's block sizes compute exactly the same thing, so only the first is kept;
a static layout that visits every block is dense and is dropped in favour of ``dense``. The shared sparse
candidates of the families in RESCALE_FAMILIES also come re-scaled (the ``rescale`` modifier), which pays a dense
refresh every few steps for a much smaller error at the same layout. ``reuse`` (held and extrapolated) pays the
same refresh and nothing between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.layout import Grid, num_blocks
from dit_sparse.plan import HeadStrategy
from dit_sparse.strategies import BuildContext, get_strategy

# Diagonal windows: temporal half-widths in frames x spatial half-widths as fractions of the grid.
DIAGONAL_FRAMES = (0, 1, 2)
DIAGONAL_SPATIAL = (0.125, 0.25, 0.5, 1.0)
# Temporal stripes: the same spatial neighbourhood in every frame (0 = the same token position).
MULTI_DIAGONAL_SPATIAL = (0, 0.125, 0.25, 0.5)
BLOCK_ADAPTIVE = ((0.8, 0.25), (0.9, 0.25), (0.95, 0.25), (0.95, 0.5))  # (tau, cap)
PYRAMID_BANDS = ((0.6, 0.8, 0.9, 0.95), (0.8, 0.9, 0.95, 0.98))
# Key blocks chosen by attention mass per head, as fractions of the key blocks (at least one block).
MASS_BLOCK_FRACTIONS = (1 / 16, 1 / 8)
# Families whose shared candidates are also tried with the re-scaled softmax (pyramid's pooled levels are not).
RESCALE_FAMILIES = ("diagonal", "multi_diagonal", "vertical_stripe", "block_adaptive")


@dataclass(frozen=True)
class Candidate:
    """One option for a head.

    key: stable identifier (the strategy's description, or the template's name for per-head candidates).
    spec: the strategy shared by every head, or None for a per-head template (resolved at calibration).
    mass_blocks: for the per-head `vertical_stripe` template, how many key blocks are chosen by mass.
    """

    key: str
    family: str
    spec: HeadStrategy | None
    mass_blocks: int = 0

    @property
    def per_head(self) -> bool:
        return self.spec is None

    @property
    def dense(self) -> bool:
        return get_strategy(self.family).dense

    @property
    def dynamic(self) -> bool:
        return get_strategy(self.family).dynamic

    @property
    def pooled(self) -> bool:
        return get_strategy(self.family).pooled

    @property
    def computes(self) -> bool:
        return get_strategy(self.family).computes

    @property
    def fp8(self) -> bool:
        return bool(self.spec is not None and self.spec.fp8)

    @property
    def rescale(self) -> bool:
        return bool(self.spec is not None and self.spec.rescale)

    @property
    def reuses(self) -> bool:
        return get_strategy(self.family).reuses

    @property
    def refreshes(self) -> bool:
        """Runs dense at refresh steps besides its layout (re-scaled) or instead of nothing (reuse)."""
        return self.rescale or self.reuses

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "family": self.family,
                "spec": None if self.spec is None else self.spec.to_json(), "mass_blocks": self.mass_blocks}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        spec = None if data["spec"] is None else HeadStrategy.from_json(data["spec"], f"candidate {data['key']}")
        return cls(data["key"], data["family"], spec, int(data.get("mass_blocks", 0)))


def shared(strategy: str, **params) -> Candidate:
    spec = HeadStrategy.make(strategy, "$.candidate", **params)
    return Candidate(spec.describe(), strategy, spec)


def mass_stripe(blocks: int) -> Candidate:
    return Candidate(f"vertical_stripe(columns by mass, {blocks} key block{'s' if blocks > 1 else ''})",
                     "vertical_stripe", None, blocks)


def with_modifier(candidate: Candidate, modifier: str) -> Candidate:
    """The same candidate with the `fp8` or `rescale` modifier (shared candidates only)."""
    params = {k: v for k, v in candidate.spec.to_json().items() if k != "strategy"}
    spec = HeadStrategy.make(candidate.family, "$.candidate", **{**params, modifier: True})
    return Candidate(spec.describe(), candidate.family, spec)


def with_fp8(candidate: Candidate) -> Candidate:
    return with_modifier(candidate, "fp8")


def rescaled_variants(cands: list[Candidate]) -> list[Candidate]:
    """The re-scaled twin of every shared sparse candidate of RESCALE_FAMILIES."""
    return [with_modifier(c, "rescale") for c in cands
            if c.family in RESCALE_FAMILIES and not c.per_head and not c.rescale and not c.fp8]


def default_candidates(grid: Grid, block_q: int, block_k: int, rescale: bool = True) -> list[Candidate]:
    """Every candidate family at several widths and thresholds, deduplicated at these block sizes; with
    `rescale`, the re-scaled twins of the shared sparse ones follow."""
    cands = [shared("dense"), shared("skip"), shared("reuse", extrapolate=False), shared("reuse")]
    cands += [shared("diagonal", window=[t, s, s]) for t in DIAGONAL_FRAMES for s in DIAGONAL_SPATIAL]
    cands += [shared("multi_diagonal", window=[s, s]) for s in MULTI_DIAGONAL_SPATIAL]
    cands += [shared("vertical_stripe", first_frames=1)]
    nk = num_blocks(grid.num_tokens, block_k)
    for blocks in sorted({max(1, round(f * nk)) for f in MASS_BLOCK_FRACTIONS}):
        cands.append(mass_stripe(blocks))
    cands += [shared("block_adaptive", tau=tau, cap=cap) for tau, cap in BLOCK_ADAPTIVE]
    if block_k % 8 == 0:  # pooled levels need block_k to be a multiple of 2**MAX_LEVEL
        cands += [shared("pyramid", bands=list(b)) for b in PYRAMID_BANDS]
    cands = dedupe(cands, grid, block_q, block_k)
    return cands + rescaled_variants(cands) if rescale else cands


def static_level_map(candidate: Candidate, grid: Grid, block_q: int, block_k: int) -> torch.Tensor:
    """(1, 1, NQ, NK) int8 levels of a shared static candidate (-1 = not visited)."""
    spec = candidate.spec
    ctx = BuildContext(grid, block_q, block_k)
    if spec.impl.dense:
        nq, nk = num_blocks(grid.num_tokens, block_q), num_blocks(grid.num_tokens, block_k)
        return torch.zeros(1, 1, nq, nk, dtype=torch.int8)
    return get_strategy(spec.strategy).layout(spec.param_dict, ctx).level_map().to(torch.int8)


def dedupe(cands: list[Candidate], grid: Grid, block_q: int, block_k: int) -> list[Candidate]:
    """Drop static candidates whose layout (and modifiers) equal an earlier one's, or visit every block (that is
    dense)."""
    seen: list[tuple[torch.Tensor, tuple[bool, bool]]] = []
    out = []
    for cand in cands:
        if cand.per_head or cand.dynamic or not cand.computes or cand.dense:
            out.append(cand)
            continue
        levels = static_level_map(cand, grid, block_q, block_k)
        if bool((levels == 0).all()):
            continue
        modifiers = (cand.fp8, cand.rescale)
        if any(mods == modifiers and torch.equal(levels, other) for other, mods in seen):
            continue
        seen.append((levels, modifiers))
        out.append(cand)
    return out


def mass_columns(block_mass: torch.Tensor, token_mass: torch.Tensor, blocks: int, block_k: int) -> list[int]:
    """Token columns for one head: the highest-mass token of each of the `blocks` highest-mass key blocks.

    block_mass: (NK,) attention mass per key block; token_mass: (S,) per key token. Listing one token per block
    keeps the plan short while selecting exactly those blocks at this block size.
    """
    top = torch.topk(block_mass, min(blocks, block_mass.numel())).indices.sort().values
    cols = []
    for b in top.tolist():
        start = b * block_k
        cols.append(start + int(token_mass[start:start + block_k].argmax()))
    return cols


def mass_spec(columns: list[int]) -> HeadStrategy:
    return HeadStrategy.make("vertical_stripe", "$.candidate", first_frames=0, columns=list(columns))
