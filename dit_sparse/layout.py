"""The block layout: the one form every strategy compiles to and every executor runs.

The video sequence (frame-major tokens) is cut into query blocks of ``block_q`` tokens and key blocks of
``block_k`` tokens; the last block of either may be ragged. For each (batch, head, query block) the layout
lists the key blocks to visit, ascending, with a pooling level each: level ``l`` means the keys and values of
that block are mean-pooled over groups of ``2**l`` consecutive tokens and every pooled key gets ``+ln(n)``
added to its score, ``n`` being the number of tokens it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LEVEL = 3


def num_blocks(seq_len: int, block: int) -> int:
    return -(-seq_len // block)


@dataclass(frozen=True)
class Grid:
    """Video tokens as (frames, height, width), frame-major: token = (f * height + y) * width + x."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    def coords(self, device=None) -> torch.Tensor:
        """(num_tokens, 3) long tensor of (frame, row, col) per token."""
        f, y, x = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([f.flatten(), y.flatten(), x.flatten()], dim=1)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Look-up table of key blocks per query block.

    kv_index: (B, H, NQ, K) int32, key-block ids ascending within ``kv_count``; entries past the count are 0.
    kv_count: (B, H, NQ) int32, >= 1.
    kv_level: (B, H, NQ, K) int8 pooling levels, or None when every entry is full resolution.
    B and H may be 1, meaning the same layout for every batch element or head.
    """

    seq_len: int
    block_q: int
    block_k: int
    kv_index: torch.Tensor
    kv_count: torch.Tensor
    kv_level: torch.Tensor | None = None
    # True for a layout derived from a checked one (expanded, some heads selected, heads stacked): its values need no
    # second check, which would read them back from the device (and cannot run inside a compiled graph).
    derived: bool = field(default=False, kw_only=True, compare=False, repr=False)

    def __post_init__(self):
        # Derived tables executors compute once per layout (static layouts are reused across steps and calls);
        # not a dataclass field, so hashing and tracing see only the table itself.
        object.__setattr__(self, "_memo", {})
        nq, nk = num_blocks(self.seq_len, self.block_q), num_blocks(self.seq_len, self.block_k)
        if self.kv_index.dim() != 4 or self.kv_index.shape[2] != nq:
            raise ValueError(f"kv_index must be (B, H, {nq}, K), got {tuple(self.kv_index.shape)}")
        if self.kv_count.shape != self.kv_index.shape[:3]:
            raise ValueError(f"kv_count {tuple(self.kv_count.shape)} does not match kv_index "
                             f"{tuple(self.kv_index.shape)}")
        if self.kv_level is not None and self.kv_level.shape != self.kv_index.shape:
            raise ValueError("kv_level must have the shape of kv_index")
        if self.block_k % (2**MAX_LEVEL) and self.kv_level is not None:
            raise ValueError(f"block_k must be a multiple of {2**MAX_LEVEL} for pooled levels")
        if not self.derived and (int(self.kv_count.min()) < 1 or int(self.kv_count.max()) > nk):
            raise ValueError("every query block must visit between 1 and all key blocks")

    @property
    def memo(self) -> dict:
        return self._memo

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_k)

    @property
    def max_level(self) -> int:
        # Memoised: executors ask on every call, and reading it from the table is a device sync.
        if "max_level" not in self._memo:
            self._memo["max_level"] = 0 if self.kv_level is None else int(self.kv_level.max())
        return self._memo["max_level"]

    @classmethod
    def from_block_mask(
        cls, mask: torch.Tensor, seq_len: int, block_q: int, block_k: int, levels: torch.Tensor | None = None
    ) -> "BlockLayout":
        """Build from a (B, H, NQ, NK) boolean block mask (and optional int levels of the same shape)."""
        mask = mask.bool()
        count = mask.sum(-1).to(torch.int32)
        width = max(int(count.max()), 1)
        # Stable sort puts selected blocks first in ascending order.
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        valid = torch.arange(width, device=mask.device) < count.unsqueeze(-1)
        index = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32)
        level = None
        if levels is not None and bool((levels[mask] > 0).any()):
            level = torch.where(valid, levels.gather(-1, order), torch.zeros_like(order)).to(torch.int8)
        return cls(seq_len, block_q, block_k, index.contiguous(), count.contiguous(), level)

    def block_mask(self) -> torch.Tensor:
        """(B, H, NQ, NK) boolean mask of visited key blocks."""
        return self._scatter(torch.ones_like(self.kv_index, dtype=torch.bool), torch.bool)

    def level_map(self) -> torch.Tensor:
        """(B, H, NQ, NK) int levels; -1 where a key block is not visited."""
        levels = self.kv_level if self.kv_level is not None else torch.zeros_like(self.kv_index, dtype=torch.int8)
        return self._scatter(levels.long() + 1, torch.long) - 1

    def _scatter(self, values: torch.Tensor, dtype) -> torch.Tensor:
        b, h, nq, k = self.kv_index.shape
        out = torch.zeros(b, h, nq, self.num_k_blocks + 1, dtype=dtype, device=self.kv_index.device)
        valid = torch.arange(k, device=self.kv_index.device) < self.kv_count.unsqueeze(-1)
        # Invalid entries land in a spare column that is dropped.
        target = torch.where(valid, self.kv_index.long(), torch.full_like(self.kv_index.long(), self.num_k_blocks))
        out.scatter_(-1, target, values.to(dtype))
        return out[..., : self.num_k_blocks]

    def density(self) -> float:
        """Fraction of dense attention work executed: visited keys per query, pooled keys counted once.

        Memoised: attend counts it on every call, and computing it costs a few ms (and a device sync on GPU).
        """
        if "density" not in self._memo:
            self._memo["density"] = self._density()
        return self._memo["density"]

    def _density(self, rows: slice | None = None) -> float:
        q_sizes = block_sizes(self.seq_len, self.block_q, self.kv_index.device).double()
        if rows is not None:  # only these query rows: each block counts the rows it holds of them
            first = torch.arange(len(q_sizes), device=q_sizes.device, dtype=torch.float64) * self.block_q
            q_sizes = (torch.minimum(first + q_sizes, torch.tensor(float(rows.stop)))
                       - torch.maximum(first, torch.tensor(float(rows.start)))).clamp(min=0)
        k_sizes = block_sizes(self.seq_len, self.block_k, self.kv_index.device).double()
        levels = self.level_map()
        work = torch.zeros(levels.shape, dtype=torch.float64, device=levels.device)
        for level in range(MAX_LEVEL + 1):
            work += (levels == level) * torch.ceil(k_sizes / 2**level)
        per_row = (work.sum(-1) * q_sizes).sum(-1)
        return float(per_row.mean() / (self.seq_len * self.seq_len))

    def density_of_rows(self, rows: slice) -> float:
        """The work of the query rows in `rows` alone, as a fraction of dense attention over all rows."""
        return self._density(rows)

    def expand(self, batch: int, heads: int) -> "BlockLayout":
        """The same layout with explicit batch and head dimensions."""
        shape = (batch, heads) + tuple(self.kv_index.shape[2:])
        level = None if self.kv_level is None else self.kv_level.expand(shape)
        return BlockLayout(
            self.seq_len, self.block_q, self.block_k, self.kv_index.expand(shape),
            self.kv_count.expand(shape[:3]), level, derived=True,
        )

    def select_heads(self, heads: torch.Tensor | list[int]) -> "BlockLayout":
        if self.kv_index.shape[1] == 1:
            return self
        idx = torch.as_tensor(heads, device=self.kv_index.device, dtype=torch.long)
        level = None if self.kv_level is None else self.kv_level.index_select(1, idx)
        return BlockLayout(
            self.seq_len, self.block_q, self.block_k, self.kv_index.index_select(1, idx),
            self.kv_count.index_select(1, idx), level, derived=True,
        )

    @staticmethod
    def concat_heads(layouts: list["BlockLayout"], heads_each: list[int]) -> "BlockLayout":
        """Stack per-group layouts along the head dimension (each expanded to its head count)."""
        first = layouts[0]
        batch = max(lay.kv_index.shape[0] for lay in layouts)
        width = max(lay.kv_index.shape[-1] for lay in layouts)
        idx, cnt, lev = [], [], []
        any_level = any(lay.kv_level is not None for lay in layouts)
        for lay, h in zip(layouts, heads_each):
            e = lay.expand(batch, h)
            pad = width - e.kv_index.shape[-1]
            idx.append(torch.nn.functional.pad(e.kv_index, (0, pad)))
            cnt.append(e.kv_count)
            if any_level:
                lv = e.kv_level if e.kv_level is not None else torch.zeros_like(e.kv_index, dtype=torch.int8)
                lev.append(torch.nn.functional.pad(lv, (0, pad)))
        return BlockLayout(
            first.seq_len, first.block_q, first.block_k, torch.cat(idx, 1), torch.cat(cnt, 1),
            torch.cat(lev, 1) if any_level else None, derived=True,
        )


def block_sizes(seq_len: int, block: int, device=None) -> torch.Tensor:
    """(num_blocks,) tokens per block; the last one may be ragged."""
    n = num_blocks(seq_len, block)
    sizes = torch.full((n,), block, dtype=torch.long, device=device)
    sizes[-1] = seq_len - (n - 1) * block
    return sizes


def ln_group_sizes(seq_len: int, level: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(ceil(S / 2**level),) log of the number of tokens each pooled key stands for."""
    n = 2**level
    groups = num_blocks(seq_len, n)
    sizes = torch.full((groups,), float(n), device=device, dtype=dtype)
    sizes[-1] = seq_len - (groups - 1) * n
    return torch.log(sizes)


def pool_tokens(x: torch.Tensor, level: int) -> torch.Tensor:
    """Mean-pool (B, S, H, D) over groups of 2**level consecutive tokens (the last group may be partial)."""
    if level == 0:
        return x
    n = 2**level
    b, s, h, d = x.shape
    groups = num_blocks(s, n)
    pad = groups * n - s
    summed = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).reshape(b, groups, n, h, d).sum(2)
    counts = torch.full((groups,), float(n), device=x.device, dtype=x.dtype)
    counts[-1] = s - (groups - 1) * n
    return summed / counts.view(1, groups, 1, 1)


def own_block_mask(seq_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(NQ, NK) boolean: key blocks that overlap each query block's token span (the 'diagonal' blocks)."""
    nq, nk = num_blocks(seq_len, block_q), num_blocks(seq_len, block_k)
    first = torch.arange(nq, device=device) * block_q
    last = torch.clamp(first + block_q, max=seq_len) - 1
    kb = torch.arange(nk, device=device).unsqueeze(0)
    return (kb >= (first // block_k).unsqueeze(1)) & (kb <= (last // block_k).unsqueeze(1))


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of tokens: (B, S, H, D) -> (B, NB, H, D); the last block may be ragged."""
    b, s, h, d = x.shape
    nb = num_blocks(s, block)
    summed = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * block - s)).reshape(b, nb, block, h, d).sum(2)
    return summed / block_sizes(s, block, x.device).to(x.dtype).view(1, nb, 1, 1)
