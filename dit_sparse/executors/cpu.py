"""The fast path on CPU: gather each query block's visited keys (full or pooled) and run fused SDPA on them.

Per (batch, head, query block) the visited key blocks become one list of key rows taken from the full-resolution
keys and their pooled copies; pooled keys carry +ln(n) as an additive bias. Query blocks are grouped by the length
of their list, so no list is padded and level-0 groups need no mask at all. The attention itself is PyTorch's
fused CPU flash kernel, which also returns the LSE; a list longer than ``MAX_KEYS_PER_CALL`` is attended in
pieces whose outputs are merged by their LSEs, which keeps each call's keys in cache.

What a layout implies (row tables, groups, biases) is computed once per layout and kept in ``layout.memo``, so
a call with a known layout makes no host-side decision that reads a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dense import cpu_flash_attention, merge_aligned
from ..fp8 import executor_inputs
from ..layout import BlockLayout, num_blocks
from . import Executor, register_executor
from .reference import extended_keys

# Gathered key+value elements per kernel call. Small enough that the gathered rows are still in the last-level
# cache when the kernel reads them, large enough that each call has work for every thread.
_GATHER_BUDGET = 1 << 20
# Longest key list one kernel call attends; longer lists are cut into near-equal pieces merged by their LSEs.
# PyTorch's CPU flash kernel splits fewer than 768 queries into runs of 64 and streams all of a call's keys for each
# run, so a list too long for the per-core L2 is read from further out four times per query block. At 32,760 tokens,
# 12 heads, head dim 128 and 25% density, pieces of 1024 or 2048 keys ran 7-12% faster than uncut lists of 8192
# (`benchmarks/results/cpu_executor-2026-12-07.json`, "piece_sizes").
MAX_KEYS_PER_CALL = 1024


def key_rows(layout: BlockLayout):
    """Per query block, the rows of the extended key tensor it visits, valid rows first and ascending.

    Returns index (B', H', NQ, L) into the extended sequence, count (B', H', NQ) of valid rows and the level of
    each row (B', H', NQ, L), with L the longest list; B', H' as in the layout (possibly 1).
    """
    seq, bk = layout.seq_len, layout.block_k
    levels = (layout.kv_level.long() if layout.kv_level is not None
              else torch.zeros_like(layout.kv_index, dtype=torch.long))
    device = layout.kv_index.device
    sizes = [num_blocks(seq, 2**level) for level in range(layout.max_level + 1)]
    offsets = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    pooled_len = torch.tensor(sizes, device=device)
    seg = bk >> levels  # rows per key block at its level
    start = offsets[levels] + layout.kv_index.long() * seg
    seg_len = torch.minimum(seg, pooled_len[levels] - layout.kv_index.long() * seg)
    pos = torch.arange(bk, device=device)
    entry_valid = torch.arange(layout.kv_index.shape[-1], device=device) < layout.kv_count.unsqueeze(-1)
    valid = ((pos < seg_len.unsqueeze(-1)) & entry_valid.unsqueeze(-1)).flatten(-2)
    index = torch.where(valid, (start.unsqueeze(-1) + pos).flatten(-2), 0)
    row_levels = levels.unsqueeze(-1).expand(*levels.shape, bk).flatten(-2)
    # Compact valid rows to the front (stable keeps them ascending) and cut to the longest list.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    count = valid.sum(-1)
    order = order[..., :int(count.max())]
    return index.gather(-1, order), count, row_levels.gather(-1, order)


@dataclass(frozen=True)
class _Group:
    """Query blocks (of any batch element and head) that visit the same number of key rows.

    items (N,) index the (B * H * NQ) query blocks; q_rows (N, block_q) and k_rows (N, width) index the
    (B * S * H, D) views of q and of the extended keys; bias (N, 1, 1, width) is the +ln(n) of pooled rows, None
    when every row is full resolution.
    """

    width: int
    items: torch.Tensor
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    bias: torch.Tensor | None


def _max_level(layout: BlockLayout) -> int:
    """The layout's deepest pooling level, read from its tensor only the first time."""
    if "max_level" not in layout.memo:
        layout.memo["max_level"] = layout.max_level
    return layout.memo["max_level"]


def _groups(layout: BlockLayout, b: int, h: int, s_ext: int, dtype, device) -> list[_Group]:
    """The groups of a layout for inputs of this shape, memoised on the layout."""
    key = ("cpu_groups", b, h, s_ext, dtype, str(device))
    if key not in layout.memo:
        layout.memo[key] = _build_groups(layout, b, h, s_ext, dtype, device)
    return layout.memo[key]


def _build_groups(layout: BlockLayout, b: int, h: int, s_ext: int, dtype, device) -> list[_Group]:
    index, count, row_levels = (x.to(device) for x in key_rows(layout))
    nq, bq, s = layout.num_q_blocks, layout.block_q, layout.seq_len
    shape = (b, h, nq)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    head = torch.arange(h, device=device).view(1, h, 1, 1)
    # The ragged last query block repeats the last token; those rows are computed and dropped.
    tokens = torch.arange(nq * bq, device=device).clamp_max(s - 1).view(1, 1, nq, bq)
    q_rows = ((batch * s + tokens) * h + head).reshape(-1, bq)
    k_rows = ((batch * s_ext + index.expand(*shape, -1)) * h + head).reshape(b * h * nq, -1)
    row_levels = row_levels.expand(*shape, -1).reshape(b * h * nq, -1)
    count = count.expand(shape).reshape(-1)
    bias = _ln_bias(layout, device) if layout.max_level > 0 else None
    groups = []
    for width in torch.unique(count).tolist():
        if width == 0:
            continue  # query blocks that visit nothing (outside a ring rank's rows): not computed, their rows unused
        items = torch.nonzero(count == width).flatten()
        rows = k_rows[items, :width]
        pooled = bias is not None and bool((row_levels[items, :width] > 0).any())
        row_bias = bias[rows // h % s_ext].to(dtype).view(-1, 1, 1, width) if pooled else None
        groups.append(_Group(width, items, q_rows[items], rows, row_bias))
    return groups


def _ln_bias(layout: BlockLayout, device) -> torch.Tensor:
    """(S_ext,) +ln(n) of every key of the extended sequence (0 at full resolution)."""
    probe = torch.zeros(1, layout.seq_len, 1, 1, device=device)
    return extended_keys(probe, probe, layout.max_level)[2]


def _pieces(width: int, whole: bool) -> list[tuple[int, int]]:
    """Column ranges of a key list: near-equal, each at most MAX_KEYS_PER_CALL long; the whole list when whole."""
    count = 1 if whole else -(-width // MAX_KEYS_PER_CALL)
    size = -(-width // count)
    return [(start, min(start + size, width)) for start in range(0, width, size)]


def _run_group(group: _Group, flat, out, lse, scale):
    """Attend every query block of the group, a cache-sized chunk at a time, into out (BHN, bq, D), lse (BHN, bq)."""
    q_flat, k_flat, v_flat = flat
    d, bq, width = q_flat.shape[-1], group.q_rows.shape[-1], group.width
    n_items = group.items.shape[0]
    # Autograd (training through the executor) cannot record out= gathers, so it gets fresh buffers; and the fused
    # kernel's backward ignores the LSE's gradient, which the merge of pieces needs, so it gets the list whole.
    track = torch.is_grad_enabled() and (q_flat.requires_grad or k_flat.requires_grad or v_flat.requires_grad)
    pieces = _pieces(width, whole=track)
    piece_width = pieces[0][1] - pieces[0][0]
    chunk = max(2, _GATHER_BUDGET // (piece_width * d * 2))
    # Reused across chunks: fresh multi-MB buffers would be page-faulted in again on every chunk.
    kbuf = None if track else k_flat.new_empty(min(chunk, n_items) * piece_width, d)
    vbuf = None if track else torch.empty_like(kbuf)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        n = stop - start
        qq = torch.index_select(q_flat, 0, group.q_rows[start:stop].reshape(-1)).view(n, 1, bq, d)
        block_out = block_lse = None
        for first, last in pieces:
            rows = group.k_rows[start:stop, first:last].reshape(-1)
            kk = _gather(k_flat, rows, kbuf).view(n, 1, last - first, d)
            vv = _gather(v_flat, rows, vbuf).view(n, 1, last - first, d)
            mask = group.bias[start:stop, ..., first:last] if group.bias is not None else None
            # q (n, 1, bq, D), k/v (n, 1, w, D), mask (n, 1, 1, w) additive or None -> out, lse (n, 1, bq)
            piece_out, piece_lse = cpu_flash_attention(qq, kk, vv, mask, scale)
            if block_out is None:
                block_out, block_lse = piece_out, piece_lse.float()
            else:
                # The first piece's output is the kernel's fresh tensor (or its fp32 copy), so it is accumulated into.
                block_out, block_lse = merge_aligned(block_out.float(), block_lse, piece_out, piece_lse.float(),
                                                     in_place=True)
        items = group.items[start:stop]
        out.index_copy_(0, items, block_out.view(n, bq, d).to(out.dtype))
        lse.index_copy_(0, items, block_lse.view(n, bq))


def _gather(src, rows, buf):
    """src[rows], into the front of buf when one is given."""
    if buf is None:
        return torch.index_select(src, 0, rows)
    return torch.index_select(src, 0, rows, out=buf[: rows.shape[0]])


def _compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _extended_len(seq: int, max_level: int) -> int:
    """Length of the extended key sequence: full resolution, then each pooled level."""
    return sum(num_blocks(seq, 2**level) for level in range(max_level + 1))


def prepare_layout(layout: BlockLayout, batch: int, heads: int, dtype, device) -> None:
    """Build the tables a call with (batch, S, heads, D) inputs of this dtype needs, ahead of the first call."""
    s_ext = _extended_len(layout.seq_len, _max_level(layout))
    _groups(layout, batch, heads, s_ext, _compute_dtype(dtype), torch.device(device))


def cpu_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None, fp8: bool = False):
    """q, k, v: (B, S, H, D). Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32."""
    out_dtype = q.dtype
    q, k, v, scale, lse_shift = executor_inputs(q, k, v, layout.block_q, layout.block_k, scale, fp8)
    b, s, h, d = q.shape
    bq, nq = layout.block_q, layout.num_q_blocks
    compute_dtype = _compute_dtype(q.dtype)
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)

    max_level = _max_level(layout)
    groups = _groups(layout, b, h, _extended_len(s, max_level), compute_dtype, q.device)
    k_ext, v_ext, _ = extended_keys(k, v, max_level)
    # Rows of the (B * S * H, D) views: gathering straight from (B, S, H, D) avoids transposed copies.
    flat = (q.reshape(-1, d), k_ext.reshape(-1, d), v_ext.reshape(-1, d))
    out = torch.empty(b * h * nq, bq, d, dtype=compute_dtype, device=q.device)
    lse = torch.empty(b * h * nq, bq, dtype=torch.float32, device=q.device)
    for group in groups:
        _run_group(group, flat, out, lse, scale)
    out = out.view(b, h, nq * bq, d)[:, :, :s].permute(0, 2, 1, 3)
    return out.to(out_dtype), lse.view(b, h, nq * bq)[:, :, :s] + lse_shift


register_executor(
    Executor(
        name="cpu",
        run=cpu_attention,
        block_sizes=lambda device, head_dim: (256, 128),
        priority=1,
        prepare=prepare_layout,
    )
)
