"""Where this process sits in diffusers' context-parallel mesh: its Ulysses group and its ring group.

diffusers (`transformer.enable_parallelism(config=ContextParallelConfig(...))`) builds a ("ring", "ulysses") device
mesh and splits the sequence over the flattened mesh, ring-major: shard `ring_rank * ulysses_degree + ulysses_rank`.
dit-sparse reads that mesh and nothing else, so every rank agrees with diffusers on which tokens it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UnsupportedParallelismError(ValueError):
    """A context-parallel setup dit-sparse cannot run a plan under; raised before any attention runs."""


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """This rank's place in the mesh. Groups are torch.distributed process groups (None when the degree is 1)."""

    ulysses_size: int
    ulysses_rank: int
    ulysses_group: Any
    ring_size: int
    ring_rank: int
    ring_group: Any
    # All ranks of the mesh, in shard order (diffusers splits the sequence over this flattened group).
    world_group: Any = None
    # Key/value shards this rank's ring group sent, summed over attentions, and what dense ring attention would have
    # sent: every shard to every other rank (`ring.RingTraffic`).
    traffic: dict = field(default_factory=lambda: {"sent": 0, "dense": 0})

    def shard_lengths(self, total: int) -> list[int]:
        """How diffusers splits `total` tokens over the mesh's ranks (shard order): `tensor_split`, so even splits
        are equal and uneven ones (its `*_anything` modes) give the first ranks one token more."""
        return split_lengths(total, self.world)

    def ulysses_lengths(self, total: int) -> list[int]:
        """The shards of this rank's Ulysses group, in its rank order."""
        lengths = self.shard_lengths(total)
        return lengths[self.ring_rank * self.ulysses_size:(self.ring_rank + 1) * self.ulysses_size]

    def ring_lengths(self, total: int) -> list[int]:
        """What each ring rank holds after the Ulysses exchange: its Ulysses group's shards together."""
        lengths = self.shard_lengths(total)
        u = self.ulysses_size
        return [sum(lengths[r * u:(r + 1) * u]) for r in range(self.ring_size)]

    @property
    def world(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def shard(self) -> int:
        """Which sequence shard diffusers gave this rank (flattened mesh, ring-major)."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    def heads(self, total: int) -> slice:
        """The heads this rank attends over after the Ulysses all-to-all: a contiguous run."""
        per_rank = total // self.ulysses_size
        return slice(self.ulysses_rank * per_rank, (self.ulysses_rank + 1) * per_rank)

    def describe(self) -> str:
        parts = [f"ulysses {self.ulysses_size}"] if self.ulysses_size > 1 else []
        parts += [f"ring {self.ring_size}"] if self.ring_size > 1 else []
        return " x ".join(parts)


def split_lengths(total: int, parts: int) -> list[int]:
    """torch.tensor_split's piece lengths: the first total % parts pieces one longer."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def context_parallel_config(transformer, processor=None):
    """The ParallelConfig with a context-parallel part in force on `transformer` (set by enable_parallelism, on the
    model when it came before the plan, on the processor when after), or None. Its `context_parallel_config` is
    the ContextParallelConfig; the config itself is what diffusers' own processors take."""
    for holder in (transformer, processor):
        config = getattr(holder, "_parallel_config", None)
        if getattr(config, "context_parallel_config", None) is not None:
            return config
    return None


def sequence_parallel(cp, heads: int, model_name: str) -> SequenceParallel:
    """This rank's SequenceParallel for a set-up ContextParallelConfig, or a clear refusal of what dit-sparse cannot
    run: head counts that Ulysses cannot divide (diffusers' `ulysses_anything` allows them; uneven sequence splits
    are supported)."""
    if getattr(cp, "_ulysses_mesh", None) is None or getattr(cp, "_ring_mesh", None) is None:
        raise UnsupportedParallelismError(
            f"{model_name}: its ContextParallelConfig has no device mesh yet; enable it with "
            "transformer.enable_parallelism(config=...), which sets the mesh up")
    ulysses, ring = int(cp.ulysses_degree), int(cp.ring_degree)
    if heads % ulysses:
        raise UnsupportedParallelismError(
            f"{model_name} has {heads} attention heads, which ulysses_degree={ulysses} does not divide; choose a "
            f"Ulysses degree that divides {heads}, or use ring_degree for the rest")
    flattened = getattr(cp, "_flattened_mesh", None)
    topology = SequenceParallel(
        ulysses, cp._ulysses_mesh.get_local_rank(), cp._ulysses_mesh.get_group() if ulysses > 1 else None,
        ring, cp._ring_mesh.get_local_rank(), cp._ring_mesh.get_group() if ring > 1 else None,
        world_group=flattened.get_group() if flattened is not None else None)
    if flattened is not None:
        import torch.distributed as dist

        diffusers_shard = dist.get_rank(flattened.get_group())
        if diffusers_shard != topology.shard:
            raise UnsupportedParallelismError(
                f"{model_name}: this rank holds sequence shard {diffusers_shard}, but its mesh coordinates (ring "
                f"{topology.ring_rank}, ulysses {topology.ulysses_rank}) say {topology.shard}; dit-sparse needs the "
                "ring-major mesh that ContextParallelConfig builds")
    return topology
