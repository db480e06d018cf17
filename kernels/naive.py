"""Pure-PyTorch twins of the custom ops, with the same signatures: the kernels' contract, in slow clear code.

They read the same look-up tables as the kernels (not the BlockLayout), so comparing them with the reference
executor checks the host-side tables, and comparing the kernels with them checks the kernels. Memory is
O(S * S_ext): tests only.
"""

from __future__ import annotations

import torch

from .fwd_kernel import LOG2E


def _row_ranges(start, length, count, total: int) -> torch.Tensor:
    """(B, H, N, K) row ranges -> (B, H, N, total) bool: rows covered by the first ``count`` ranges."""
    k = start.shape[-1]
    valid = torch.arange(k, device=start.device) < count.long().unsqueeze(-1)
    start, end = start.long(), (start + length).long()
    marks = torch.zeros(start.shape[:-1] + (total + 1,), dtype=torch.long, device=start.device)
    marks.scatter_add_(-1, torch.where(valid, start, total), valid.long())
    marks.scatter_add_(-1, torch.where(valid, end.clamp(max=total), total), -valid.long())
    return marks[..., :total].cumsum(-1) > 0


def visited_rows(kv_index, kv_count, pooled_start, pooled_len, pooled_count, seq_len: int, block_k: int,
                 s_pool: int, batch: int, heads: int) -> torch.Tensor:
    """(B, H, NQ, S + S_pool) bool: the full-resolution and pooled key rows each query block visits."""
    kv_index, kv_count = kv_index.expand(batch, heads, *kv_index.shape[2:]), kv_count.expand(batch, heads, -1)
    start = kv_index.long() * block_k
    full = _row_ranges(start, torch.clamp(seq_len - start, max=block_k), kv_count, seq_len)
    if pooled_start is None:
        return full
    pooled = _row_ranges(
        pooled_start.expand(batch, heads, *pooled_start.shape[2:]),
        pooled_len.expand(batch, heads, *pooled_len.shape[2:]),
        pooled_count.expand(batch, heads, -1), s_pool,
    )
    return torch.cat([full, pooled], -1)


def block_sparse_fwd(q, k, v, kv_index, kv_count, pooled_k, pooled_v, pooled_bias, pooled_start, pooled_len,
                     pooled_count, block_q: int, block_k: int, scale: float, block_m: int = 0, block_n: int = 0):
    """Twin of ``torch.ops.dit_sparse.block_sparse_fwd``: (out (B, S, H, D), lse (B, H, S) fp32)."""
    b, s, h, _ = q.shape
    kf, vf = k.float(), v.float()
    bias = torch.zeros(s, device=q.device)
    s_pool = 0
    if pooled_start is not None:
        kf, vf = torch.cat([kf, pooled_k.float()], 1), torch.cat([vf, pooled_v.float()], 1)
        bias = torch.cat([bias, pooled_bias / LOG2E])
        s_pool = pooled_k.shape[1]
    rows = visited_rows(kv_index, kv_count, pooled_start, pooled_len, pooled_count, s, block_k, s_pool, b, h)
    mask = rows[:, :, torch.arange(s, device=q.device) // block_q]  # (B, H, S, S_ext)
    scores = torch.einsum("bshd,bthd->bhst", q.float(), kf) * scale + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhst,bthd->bshd", torch.exp(scores - lse.unsqueeze(-1)), vf)
    return out.to(q.dtype), lse


def block_sparse_fwd_fp8(q8, q_scale, k8, k_scale, v, v_scale, lse_shift, kv_index, kv_count, pooled_bias,
                         pooled_start, pooled_len, pooled_count, block_q: int, block_k: int, scale: float,
                         out_dtype, block_m: int = 0, block_n: int = 0):
    """Twin of ``torch.ops.dit_sparse.block_sparse_fwd_fp8``: dequantize, then the full-precision twin."""
    s = q8.shape[1]
    q = q8.float() * q_scale.permute(0, 2, 1).unsqueeze(-1)
    k = k8.float() * k_scale.permute(0, 2, 1).unsqueeze(-1)
    v = v.float() * v_scale.unsqueeze(1) if v.dtype == torch.float8_e4m3fn else v.float()
    out, lse = block_sparse_fwd(q, k[:, :s], v[:, :s], kv_index, kv_count, k[:, s:], v[:, s:], pooled_bias,
                                pooled_start, pooled_len, pooled_count, block_q, block_k, scale)
    return out.to(out_dtype), lse + lse_shift


def block_sparse_bwd(do, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count, block_q: int,
                     block_k: int, scale: float, block_m: int = 0, block_n: int = 0):
    """Twin of ``torch.ops.dit_sparse.block_sparse_bwd``: autograd through the forward twin."""
    with torch.enable_grad():
        q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
        o, lse_ = block_sparse_fwd(q, k, v, kv_index, kv_count, None, None, None, None, None, None,
                                   block_q, block_k, scale)
        loss = (o * do.float()).sum() + ((lse_ * dlse.float()).sum() if dlse is not None else 0.0)
        dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return dq.to(do.dtype), dk.to(do.dtype), dv.to(do.dtype)
