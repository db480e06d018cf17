"""How a module's heads run at a sparse step: grouped by what each strategy needs, made once per head mix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import HeadStrategy


@dataclass(frozen=True, eq=False)
class HeadSet:
    """Some heads of a module, ascending: a slice where they are contiguous (a view, no copy), else an index
    tensor kept per device (made once, so that no call copies indices from the host)."""

    heads: tuple[int, ...]
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def contiguous(self) -> bool:
        return self.heads == tuple(range(self.heads[0], self.heads[-1] + 1))

    def prepare(self, device) -> None:
        if not self.contiguous and device not in self._index:
            self._index[device] = torch.tensor(self.heads, device=device)

    def take(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        if self.contiguous:
            return x.narrow(dim, self.heads[0], len(self.heads))
        self.prepare(x.device)
        return x.index_select(dim, self._index[x.device])

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out[:, :, heads] = values, in place."""
        if self.contiguous:
            out.narrow(2, self.heads[0], len(self.heads)).copy_(values)
        else:
            self.prepare(out.device)
            out.index_copy_(2, self._index[out.device], values.to(out.dtype))


@dataclass(frozen=True)
class Launch:
    """Heads whose layouts run through the executor in one call (one FP8 setting), each with its own look-up table
    rows: `members` are the (strategy, heads) groups it holds."""

    fp8: bool
    heads: HeadSet
    members: tuple[tuple[HeadStrategy, tuple[int, ...]], ...]

    @property
    def dynamic(self) -> bool:
        """Whether some member's layout is estimated from q and k (the launch's table changes with it)."""
        return any(spec.impl.dynamic for spec, _ in self.members)


@dataclass(frozen=True)
class HeadProgram:
    """How a module's heads run at a sparse step, by what each strategy needs."""

    launches: tuple[Launch, ...]  # layouts without re-scaling: one executor call per FP8 setting
    rescaled: tuple[tuple[HeadStrategy, HeadSet], ...]  # one executor call and statistics per group
    dense: tuple[HeadSet, ...]  # the best dense kernel
    reused: tuple[tuple[HeadStrategy, HeadSet], ...]  # dense at refreshes, kept outputs between
    skipped: HeadSet | None

    @classmethod
    def of(cls, heads: tuple[HeadStrategy, ...]) -> "HeadProgram":
        grouped: dict[HeadStrategy, list[int]] = {}
        for head, spec in enumerate(heads):
            grouped.setdefault(spec, []).append(head)
        launches: dict[bool, list] = {}
        rescaled, dense, reused, skipped = [], [], [], []
        for spec, members in grouped.items():
            if spec.impl.reuses:
                reused.append((spec, HeadSet(tuple(members))))
            elif not spec.impl.computes:
                skipped.extend(members)
            elif spec.runs_dense:
                dense.append(members)
            elif spec.rescale:
                rescaled.append((spec, HeadSet(tuple(members))))
            else:
                launches.setdefault(spec.fp8, []).append((spec, tuple(members)))
        dense_heads = sorted(h for members in dense for h in members)
        return cls(
            tuple(Launch(fp8, HeadSet(tuple(sorted(h for _, m in groups for h in m))), tuple(groups))
                  for fp8, groups in launches.items()),
            tuple(rescaled), (HeadSet(tuple(dense_heads)),) if dense_heads else (), tuple(reused),
            HeadSet(tuple(sorted(skipped))) if skipped else None)

    def head_sets(self):
        yield from (launch.heads for launch in self.launches)
        yield from (heads for _, heads in self.rescaled)
        yield from self.dense
        yield from (heads for _, heads in self.reused)
        if self.skipped is not None:
            yield self.skipped

    def sparse_groups(self):
        """(strategy, heads) of every group that runs a layout: launch members, then re-scaled groups."""
        yield from (member for launch in self.launches for member in launch.members)
        yield from ((spec, heads.heads) for spec, heads in self.rescaled)

    @property
    def fp8(self) -> bool:
        return any(launch.fp8 for launch in self.launches) or any(spec.fp8 for spec, _ in self.rescaled)
