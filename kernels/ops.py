"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` treats each launch as one opaque node.

    dit_sparse::block_sparse_fwd      (q, k, v, tables, ...)               -> (out (B, S, H, D), lse (B, H, S) fp32)
    dit_sparse::block_sparse_fwd_fp8  (q8, scales, k8, v, tables, ...)     -> (out, lse)
    dit_sparse::block_sparse_bwd      (do, q, k, v, out, lse, dlse, ...)   -> (dq, dk, dv)

The look-up tables come from ``segments`` (``level0_lut``, ``pooled_segments``, ``transposed_lut``); the fake
implementations only state output shapes. ``block_m``/``block_n`` = 0 let the launcher pick tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .launch import Fp8Scales, Pooled, launch_backward, launch_forward


def _pooled(k, v, bias, start, length, count) -> Pooled | None:
    if start is None:
        return None
    return Pooled(k, v, bias, start, length, count)


@torch.library.custom_op("dit_sparse::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor,
    pooled_k: Optional[Tensor], pooled_v: Optional[Tensor], pooled_bias: Optional[Tensor],
    pooled_start: Optional[Tensor], pooled_len: Optional[Tensor], pooled_count: Optional[Tensor],
    block_q: int, block_k: int, scale: float, block_m: int = 0, block_n: int = 0,
) -> tuple[Tensor, Tensor]:
    """q, k, v (B, S, H, D); pooled_k/v (B, S_pool, H, D) or None. Returns out (B, S, H, D), lse (B, H, S)."""
    b, s, h, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    launch_forward(
        q, k, v, kv_index, kv_count, out, lse, block_q=block_q, block_k=block_k, scale=scale,
        pooled=_pooled(pooled_k, pooled_v, pooled_bias, pooled_start, pooled_len, pooled_count),
        block_m=block_m, block_n=block_n,
    )
    return out, lse


@block_sparse_fwd.register_fake
def _(q, k, v, kv_index, kv_count, pooled_k, pooled_v, pooled_bias, pooled_start, pooled_len, pooled_count,
      block_q, block_k, scale, block_m=0, block_n=0):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("dit_sparse::block_sparse_fwd_fp8", mutates_args=())
def block_sparse_fwd_fp8(
    q8: Tensor, q_scale: Tensor, k8: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor, lse_shift: Tensor,
    kv_index: Tensor, kv_count: Tensor,
    pooled_bias: Optional[Tensor], pooled_start: Optional[Tensor], pooled_len: Optional[Tensor],
    pooled_count: Optional[Tensor],
    block_q: int, block_k: int, scale: float, out_dtype: torch.dtype, block_m: int = 0, block_n: int = 0,
) -> tuple[Tensor, Tensor]:
    """The FP8 forward on ``fp8_quant.Fp8Inputs`` (k8 and v hold the pooled rows after row S). k_scale must be
    equal within each key block of block_k rows, as ``fp8_quant.quantize_inputs`` makes it.

    Returns out (B, S, H, D) in ``out_dtype`` and the LSE (B, H, S) of the original, uncentred scores.
    """
    b, s, h, _ = q8.shape
    out = torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q8.device)
    launch_forward(
        q8, k8, v, kv_index, kv_count, out, lse, block_q=block_q, block_k=block_k, scale=scale,
        pooled=_pooled(k8[:, s:], v[:, s:], pooled_bias, pooled_start, pooled_len, pooled_count),
        fp8=Fp8Scales(q_scale, k_scale, v_scale), block_m=block_m, block_n=block_n,
    )
    return out, lse + lse_shift


@block_sparse_fwd_fp8.register_fake
def _(q8, q_scale, k8, k_scale, v, v_scale, lse_shift, kv_index, kv_count, pooled_bias, pooled_start, pooled_len,
      pooled_count, block_q, block_k, scale, out_dtype, block_m=0, block_n=0):
    b, s, h, _ = q8.shape
    return q8.new_empty(q8.shape, dtype=out_dtype), q8.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("dit_sparse::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    kv_index: Tensor, kv_count: Tensor, q_index: Tensor, q_count: Tensor,
    block_q: int, block_k: int, scale: float, block_m: int = 0, block_n: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), each (B, S, H, D), of the full-resolution forward; dlse (B, H, S) or None."""
    # delta = rowsum(do * out) - dlse: one fused PyTorch reduction, memory-bound and cheap next to the kernels.
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.float()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    launch_backward(
        do, q, k, v, lse.contiguous(), delta.contiguous(), kv_index, kv_count, q_index, q_count, dq, dk, dv,
        block_q=block_q, block_k=block_k, scale=scale, block_m=block_m, block_n=block_n,
    )
    return dq, dk, dv


@block_sparse_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count, block_q, block_k, scale,
      block_m=0, block_n=0):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)
