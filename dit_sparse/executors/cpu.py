"""The fast path on CPU: gather each query block's visited keys (full or pooled) and run fused SDPA on them.

Per (batch, head, query block) the visited key blocks become one contiguous list of key rows taken from the
full-resolution keys and their pooled copies; rows are padded to the longest list with -inf bias, and
pooled keys carry +ln(n). The attention itself is PyTorch's fused CPU flash kernel, which also returns the LSE.
"""

from __future__ import annotations

import math

import torch

from ..fp8 import centring_lse_shift, fake_quantize_qkv
from ..layout import BlockLayout, num_blocks
from . import Executor, register_executor
from .reference import extended_keys

# Bound on gathered key+value elements per chunk of query blocks (keeps memory flat on long sequences).
_GATHER_BUDGET = 1 << 25


def _fused_attention(q, k, v, mask, scale):
    """q (N, 1, Lq, D), k/v (N, 1, Lk, D), mask (N, 1, 1, Lk) additive or None -> out, lse (N, 1, Lq)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )[:2]
    return out, lse


def key_rows(layout: BlockLayout):
    """Per query block, the rows of the extended key tensor it visits.

    Returns index (B', H', NQ, L) into the extended sequence, valid (B', H', NQ, L) and the level of each row,
    with L the longest list; B', H' as in the layout (possibly 1).
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
    valid = (pos < seg_len.unsqueeze(-1)) & entry_valid.unsqueeze(-1)
    valid = valid.flatten(-2)
    index = torch.where(valid, (start.unsqueeze(-1) + pos).flatten(-2), 0)
    row_levels = levels.unsqueeze(-1).expand(*levels.shape, bk).flatten(-2)
    if bool(valid.all()):
        return index, valid, row_levels
    # Compact valid rows to the front (stable keeps them ascending) and cut to the longest list.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    width = int(valid.sum(-1).max())
    order = order[..., :width]
    return index.gather(-1, order), valid.gather(-1, order), row_levels.gather(-1, order)


def _flat_rows(layout: BlockLayout, b: int, h: int, s_ext: int, device):
    """Row indices into (B * S * H, D) views of q and of the extended keys, memoised per layout and shape.

    Returns q_rows (B, H, NQ, block_q) (the ragged last block repeats the last token; those rows are dropped),
    k_rows (B, H, NQ, L) and valid (B', H', NQ, L).
    """
    key = ("flat_rows", b, h, s_ext, str(device))
    if key not in layout.memo:
        index, valid, _ = key_rows(layout)
        nq, bq, s = layout.num_q_blocks, layout.block_q, layout.seq_len
        batch = torch.arange(b, device=device).view(b, 1, 1, 1)
        head = torch.arange(h, device=device).view(1, h, 1, 1)
        tokens = torch.arange(nq * bq, device=device).clamp_max(s - 1).view(1, 1, nq, bq)
        q_rows = (batch * s + tokens) * h + head
        k_rows = (batch * s_ext + index.to(device).expand(b, h, nq, -1)) * h + head
        layout.memo[key] = (q_rows, k_rows, valid.to(device))
    return layout.memo[key]


def cpu_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None, fp8: bool = False):
    """q, k, v: (B, S, H, D). Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32."""
    out_dtype = q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lse_shift = centring_lse_shift(q, k, scale) if fp8 else 0.0
    if fp8:
        q, k, v = fake_quantize_qkv(q, k, v, layout.block_q, layout.block_k)
    b, s, h, d = q.shape
    bq, nq = layout.block_q, layout.num_q_blocks
    compute_dtype = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)

    k_ext, v_ext, bias = extended_keys(k, v, layout.max_level)
    s_ext = k_ext.shape[1]
    q_rows, k_rows, valid = _flat_rows(layout, b, h, s_ext, q.device)
    width = k_rows.shape[-1]
    needs_mask = not bool(valid.all()) or layout.max_level > 0
    bias_key = ("row_bias", b, h, s_ext, compute_dtype, str(q.device))
    if needs_mask and bias_key not in layout.memo:
        key_token = k_rows // h - (torch.arange(b, device=q.device) * s_ext).view(b, 1, 1, 1)
        layout.memo[bias_key] = torch.where(valid, bias[key_token], float("-inf")).to(compute_dtype)
    row_bias = layout.memo.get(bias_key)
    # Rows of the (B * S * H, D) views: gathering straight from (B, S, H, D) avoids transposed copies.
    q_flat, k_flat, v_flat = q.reshape(-1, d), k_ext.reshape(-1, d), v_ext.reshape(-1, d)

    out = torch.empty(b, h, nq, bq, d, dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, h, nq, bq, dtype=torch.float32, device=q.device)
    chunk = max(1, _GATHER_BUDGET // max(1, b * h * width * d * 2))
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        rows = k_rows[:, :, start:stop].reshape(-1)
        n = b * h * (stop - start)
        kk = torch.index_select(k_flat, 0, rows).view(n, 1, width, d)
        vv = torch.index_select(v_flat, 0, rows).view(n, 1, width, d)
        qq = torch.index_select(q_flat, 0, q_rows[:, :, start:stop].reshape(-1)).view(n, 1, bq, d)
        mask = row_bias[:, :, start:stop].reshape(n, 1, 1, width) if needs_mask else None
        block_out, block_lse = _fused_attention(qq, kk, vv, mask, scale)
        out[:, :, start:stop] = block_out.view(b, h, stop - start, bq, d)
        lse[:, :, start:stop] = block_lse.float().view(b, h, stop - start, bq)
    out = out.view(b, h, nq * bq, d)[:, :, :s].permute(0, 2, 1, 3)
    return out.to(out_dtype), lse.view(b, h, nq * bq)[:, :, :s] + lse_shift


register_executor(
    Executor(
        name="cpu",
        run=cpu_attention,
        block_sizes=lambda device, head_dim: (256, 128),
        available=lambda device: True,
        priority=1,
    )
)
