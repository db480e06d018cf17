"""Launchers: check arguments, pick tiles, and start the Triton kernels on caller-provided output buffers.

Everything here takes and returns plain tensors (the look-up tables already prepared by ``segments``), so the
custom ops in ``ops`` can wrap it and tests can pass NaN-filled outputs. q, k, v, do are (B, S, H, D); q, k
and do need a contiguous last dimension (any other strides), v may be fully strided. Head dims are powers
of two in [16, 128] (``attention`` pads other multiples of 16 before it gets here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import interpreting, triton
from .bwd_kernel import block_sparse_bwd_dkdv_kernel, block_sparse_bwd_dq_kernel
from .config import backward_tiles, fit_tile, forward_tiles, tensor_descriptors
from .fwd_kernel import LOG2E, block_sparse_fwd_kernel


@dataclass(frozen=True)
class Pooled:
    """Pooled levels for the forward: k, v (B, S_pool, H, D); bias (S_pool,) log2 units; segments (B', H', NQ, K)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class Fp8Scales:
    """Per-row q scales (B, H, S), per-row k scales over full and pooled rows (B, H, S + S_pool), v (B, H, D).

    The full-resolution k scales must be equal within each key block of the layout (the kernel reads the first
    row's): ``fp8_quant.quantize_inputs`` quantizes k per block_k tile, which is so.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def check_head_dim_pow2(head_dim: int) -> None:
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(
            f"the Triton kernels take head dims 16, 32, 64 or 128 (other multiples of 16 up to 128 are zero-padded "
            f"by dit_sparse.kernels.attention.block_sparse_attention), got {head_dim}"
        )


def _check_qkv(q, k, v):
    """q (B, S, H, D); k, v (B, S_k, H, D) with S_k >= S (the FP8 path appends pooled rows to k and v)."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] \
            or k.shape[1] < q.shape[1]:
        raise ValueError(f"q, k, v must be (B, S, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    # v may be sequence-contiguous (the FP8 layout); the kernels read it with full strides.
    for name, x in (("q", q), ("k", k)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")
    check_head_dim_pow2(q.shape[-1])


def _expand(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """Broadcast a (B', H', ...) table to (B, H, ...) without copying (stride 0 where B' or H' is 1)."""
    return t.expand((b, h) + tuple(t.shape[2:]))


def _tile_sizes(block_q: int, block_k: int, preferred, override_m, override_n):
    block_m = override_m or fit_tile(preferred.block_m, block_q, "block_q")
    block_n = override_n or fit_tile(preferred.block_n, block_k, "block_k")
    if block_q % block_m or block_k % block_n:
        raise ValueError(f"tiles ({block_m}, {block_n}) must divide the layout blocks ({block_q}, {block_k})")
    return block_m, block_n


def launch_forward(
    q, k, v, kv_index, kv_count, out, lse, *, block_q: int, block_k: int, scale: float,
    pooled: Pooled | None = None, fp8: Fp8Scales | None = None, block_m: int = 0, block_n: int = 0,
    descriptors: bool | None = None,
) -> None:
    """Block-sparse attention forward into ``out`` (B, S, H, D) and ``lse`` (B, H, S) fp32 contiguous.

    kv_index (B', H', NQ, K) int32 and kv_count (B', H', NQ) int32 list the full-resolution key blocks of each
    query block (``segments.level0_lut``); ``pooled`` adds the pooled levels. With ``fp8`` q, k, v are the
    float8 tensors of ``fp8_quant.quantize_inputs`` (k and v then include the pooled rows after row S, and
    ``pooled.k``/``pooled.v`` are views of them); P.V runs in fp8 when v is fp8 (whose memory must then extend
    to the end of the key block holding row S, as ``quantize_inputs`` pads it), else in v's dtype.
    ``descriptors``: read k and v through tensor descriptors (default: ``config.tensor_descriptors``); ignored
    where they cannot serve (FP8 v, misaligned k or v).
    """
    _check_qkv(q, k, v)
    b, s, h, d = q.shape
    if lse.shape != (b, h, s) or not lse.is_contiguous() or lse.dtype != torch.float32:
        raise ValueError(f"lse must be contiguous fp32 {(b, h, s)}, got {tuple(lse.shape)} {lse.dtype}")
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    tiles = forward_tiles(q.device, d)
    block_m, block_n = _tile_sizes(block_q, block_k, tiles, block_m, block_n)
    fp8_pv = v.dtype == torch.float8_e4m3fn
    if fp8_pv:
        _check_padded(v, math.ceil(s / block_k) * block_k)
    kv_index, kv_count = _expand(kv_index, b, h), _expand(kv_count, b, h)
    has_pool = pooled is not None
    if has_pool:
        p_start, p_len, p_count = (_expand(t, b, h) for t in (pooled.start, pooled.length, pooled.count))
        kp, vp, bias, s_pool = pooled.k, pooled.v, pooled.bias, pooled.k.shape[1]
    else:
        # Unused when HAS_POOL is off; any valid tensors keep the signature fixed.
        p_start, p_len, p_count = kv_index, kv_index, kv_count
        kp, vp, bias, s_pool = k, v, lse, 0
    if descriptors is None:
        descriptors = tensor_descriptors(q.device)
    desc = descriptors and not fp8_pv and _descriptor_ready(k) and _descriptor_ready(v)
    if desc and not interpreting():
        _ensure_allocator()
    dummy = lse
    qs, ks, vs = (fp8.q, fp8.k, fp8.v) if fp8 is not None else (dummy, dummy, dummy)
    grid = (math.ceil(s / block_m), b * h)
    block_sparse_fwd_kernel[grid](
        q, k, v, kp, vp, bias, qs, ks, vs,
        kv_index, kv_count, p_start, p_len, p_count,
        out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2), vp.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        *kv_index.stride(), *kv_count.stride(),
        *p_start.stride(), *p_count.stride(),
        s, s_pool, h, scale * LOG2E,
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_POOL=has_pool, FP8=fp8 is not None, FP8_PV=fp8_pv, EVEN_N=s % block_k == 0,
        IEEE=v.dtype == torch.float32, DESC=desc,
    )


def _descriptor_ready(x: torch.Tensor) -> bool:
    """A tensor descriptor over one (batch, head)'s (S, D) rows needs a 16-byte aligned start and row stride."""
    size = x.element_size()
    return x.stride(3) == 1 and x.data_ptr() % 16 == 0 and all(x.stride(i) * size % 16 == 0 for i in range(3))


def _scratch(size: int, alignment: int, stream):
    # Triton launches on the current device; torch's caching allocator makes this per-launch buffer cheap.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel descriptors live in global scratch that Triton asks an allocator for; set a torch one unless the
    caller set their own (Triton keeps it in a context variable, unset by default)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        user_set = not isinstance(_allocator.get(), NullAllocator)
    except (ImportError, AttributeError):  # a Triton whose private layout moved: ours is at least valid
        user_set = False
    if not user_set:
        triton.set_allocator(_scratch)


def _check_padded(v: torch.Tensor, rows: int) -> None:
    """FP8 v is read in whole key blocks without masks: its memory must hold ``rows`` rows, padding included
    (finite: its rows meet zero probabilities, and 0 x NaN would still be NaN)."""
    last = v.storage_offset() + sum((size - 1) * stride for size, stride in
                                    zip((v.shape[0], max(rows, v.shape[1]), *v.shape[2:]), v.stride()))
    if last >= v.untyped_storage().nbytes() // v.element_size():
        raise ValueError(
            f"fp8 v with {v.shape[1]} rows is read in whole key blocks up to row {rows}: its memory must extend past "
            "its last row (quantize with dit_sparse.kernels.fp8_quant.quantize_inputs(..., pv_fp8=True), which pads it)"
        )


def launch_backward(
    do, q, k, v, lse, delta, kv_index, kv_count, q_index, q_count, dq, dk, dv, *,
    block_q: int, block_k: int, scale: float, block_m: int = 0, block_n: int = 0,
) -> None:
    """Gradients of the full-resolution forward into dq, dk, dv (B, S, H, D).

    lse, delta: (B, H, S) fp32 contiguous, delta = rowsum(do * out) - dlse. kv_index/kv_count: the forward
    table (``segments.level0_lut``); q_index/q_count: the transposed table (``segments.transposed_lut``).
    """
    _check_qkv(q, k, v)
    b, s, h, d = q.shape
    for name, x in (("do", do), ("dq", dq), ("dk", dk), ("dv", dv)):
        if x.shape != q.shape or x.stride(-1) != 1:
            raise ValueError(f"{name} must be {tuple(q.shape)} with a contiguous last dimension")
    tiles = backward_tiles(q.device, d)
    block_m, block_n = _tile_sizes(block_q, block_k, tiles, block_m, block_n)
    lse2 = (lse * LOG2E).contiguous()
    ieee = q.dtype == torch.float32
    q_index, q_count = _expand(q_index, b, h), _expand(q_count, b, h)
    kv_index, kv_count = _expand(kv_index, b, h), _expand(kv_count, b, h)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    block_sparse_bwd_dkdv_kernel[(math.ceil(s / block_n), b * h)](
        q, k, v, do, lse2, delta, dk, dv, q_index, q_count,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *q_index.stride(), *q_count.stride(),
        s, h, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
    )
    block_sparse_bwd_dq_kernel[(math.ceil(s / block_m), b * h)](
        q, k, v, do, lse2, delta, dq, kv_index, kv_count,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        *kv_index.stride(), *kv_count.stride(),
        s, h, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        EVEN_N=s % block_k == 0,
    )
