"""Public entry: ``block_sparse_attention(q, k, v, layout)`` -> (out, lse), differentiable, on the Triton kernels.

Layering as in flash-attention: custom ops (``ops``) -> ``BlockSparseAttention`` (autograd.Function) -> this
function, which prepares the layout's tables, pads unusual head dims and chooses the FP8 route. The tables are
prepared outside the autograd.Function, so a compiled graph traces the Function without side effects.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_sparse.fp8 import centring_lse_shift, fake_quantize_qkv
from dit_sparse.layout import BlockLayout

from . import ops  # noqa: F401  (registers torch.ops.dit_sparse.*)
from .config import check_head_dim, has_fp8_tensor_cores, interpreting
from .fp8_quant import quantize_inputs
from .pool import pooled_bias, pooled_kv
from .segments import cached

logger = logging.getLogger(__name__)
_warned_fp8_fallback = False


@dataclass(frozen=True)
class Tables:
    """A layout's look-up tables as tensors.

    kv_index/kv_count: full-resolution key blocks per query block; q_index/q_count: the transposed table
    (only when a backward may follow); pooled: (bias, start, length, count) of the pooled levels, or None.
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    q_index: torch.Tensor | None
    q_count: torch.Tensor | None
    pooled: tuple | None


def prepare(layout: BlockLayout, device, *, backward: bool) -> Tables:
    """The tables a launch needs; computed once per layout object, except a plain layout's, which are its own."""
    level0 = cached(layout, "level0") if layout.kv_level is not None else (layout.kv_index, layout.kv_count)
    pooled = None
    if layout.max_level > 0:
        seg = cached(layout, "pooled")
        pooled = (pooled_bias(layout.seq_len, layout.max_level, device), seg.start, seg.length, seg.count)
    q_index = q_count = None
    if backward and pooled is None:
        q_index, q_count = cached(layout, "transposed")
    return Tables(*level0, q_index, q_count, pooled)


class BlockSparseAttention(torch.autograd.Function):
    """Autograd over the custom ops. Gradients exist for full-resolution layouts in 16/32-bit precision.

    Inputs: q, k, v (B, S, H, D); the tables of ``prepare`` (q_index/q_count None when no backward follows);
    pooled k/v (B, S_pool, H, D) and the pooled tables, or None; block_q, block_k, scale.
    """

    @staticmethod
    def forward(ctx, q, k, v, kv_index, kv_count, q_index, q_count, pooled_k, pooled_v, pooled_bias_,
                pooled_start, pooled_len, pooled_count, block_q: int, block_k: int, scale: float):
        out, lse = torch.ops.dit_sparse.block_sparse_fwd(
            q, k, v, kv_index, kv_count, pooled_k, pooled_v, pooled_bias_, pooled_start, pooled_len, pooled_count,
            block_q, block_k, scale,
        )
        ctx.save_for_backward(q, k, v, out, lse, kv_index, kv_count, q_index, q_count)
        ctx.pooled = pooled_start is not None
        ctx.blocks, ctx.scale = (block_q, block_k), scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if ctx.pooled:
            raise NotImplementedError(
                "the Triton block-sparse backward covers full-resolution layouts only; this layout has pooled "
                "levels (pyramid). Train with block_adaptive or static strategies, or on the reference executor"
            )
        q, k, v, out, lse, kv_index, kv_count, q_index, q_count = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.dit_sparse.block_sparse_bwd(
            dout.contiguous(), q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count, *ctx.blocks, ctx.scale,
        )
        return (dq, dk, dv) + (None,) * 13


class _NoBackward(torch.autograd.Function):
    """Hands the FP8 forward's results to autograd and refuses a backward with a clear message."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse):
        return out.clone(), lse.clone()

    @staticmethod
    def backward(ctx, dout, dlse):
        raise NotImplementedError("the FP8 block-sparse attention has no backward; run fp8 plans without gradients")


def _sparse_forward(q, k, v, layout: BlockLayout, scale: float):
    """The 16/32-bit route: tables first, then the autograd.Function."""
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    t = prepare(layout, q.device, backward=backward)
    kp = vp = None
    if t.pooled is not None:
        kp, vp = pooled_kv(k, v, layout.max_level, dtype=q.dtype)
    return BlockSparseAttention.apply(q, k, v, t.kv_index, t.kv_count, t.q_index, t.q_count, kp, vp,
                                      *(t.pooled or (None,) * 4), layout.block_q, layout.block_k, scale)


def _fp8_forward(q, k, v, layout: BlockLayout, scale: float):
    """The FP8 route: the FP8 tensor-core kernel where it exists (and in the interpreter), else the emulation.

    Fallback (GPUs before sm_89): q, k, v go through ``dit_sparse.fp8.fake_quantize_qkv`` (the same numerics,
    dequantized to q's dtype) and the 16-bit kernel; a warning is logged once per process.
    """
    global _warned_fp8_fallback
    if has_fp8_tensor_cores(q.device) or (interpreting() and q.device.type == "cpu"):
        f = quantize_inputs(q, k, v, layout.block_q, layout.block_k, layout.max_level, scale)
        t = prepare(layout, q.device, backward=False)
        return torch.ops.dit_sparse.block_sparse_fwd_fp8(
            f.q8, f.q_scale, f.k8, f.k_scale, f.v, f.v_scale, f.lse_shift, t.kv_index, t.kv_count,
            *(t.pooled or (None,) * 4), layout.block_q, layout.block_k, scale, q.dtype,
        )
    if not _warned_fp8_fallback:
        logger.warning(
            "fp8 requested on %s without FP8 tensor cores (needs sm_89+); running the quantize-dequantize "
            "emulation in %s instead (same numerics, no speedup)", q.device, q.dtype,
        )
        _warned_fp8_fallback = True
    qd, kd, vd = (x.to(q.dtype) for x in fake_quantize_qkv(q, k, v, layout.block_q, layout.block_k))
    out, lse = _sparse_forward(qd, kd, vd, layout, scale)
    # fake_quantize_qkv centres k; add back the per-row shift so the LSE is that of the original scores.
    return out, lse + centring_lse_shift(q, k, scale)


def _check(q, k, v, layout: BlockLayout):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, S, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, s, h, _ = q.shape
    if layout.seq_len != s:
        raise ValueError(f"layout is for {layout.seq_len} tokens, q has {s}")
    lb, lh = layout.kv_index.shape[:2]
    if lb not in (1, b) or lh not in (1, h):
        raise ValueError(f"layout batch/heads ({lb}, {lh}) do not broadcast to ({b}, {h})")
    if layout.kv_index.device != q.device:
        raise ValueError(f"layout is on {layout.kv_index.device}, q on {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(q.shape[-1])


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None, fp8: bool = False):
    """Block-sparse attention on the Triton kernels.

    q, k, v: (B, S, H, D), fp16/bf16 (fp32 works, slower), any strides; D a multiple of 16 in [16, 128].
    layout: a BlockLayout for S tokens whose batch/head dims are 1 or match q's, on q's device; its blocks
    must be multiples of 16 (``layout_block_sizes`` gives the fastest for a GPU).
    Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32, the natural-log softmax denominator of the
    scaled scores (pooled keys included with their +ln(n)). Differentiable (dq, dk, dv, also through the LSE)
    for full-resolution layouts. ``fp8=True`` quantizes q, k per tile and v per channel to e4m3 (k centred;
    the LSE is still that of the original scores) and is forward-only.
    """
    _check(q, k, v, layout)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    padded = 1 << (d - 1).bit_length()
    if padded != d:
        # Zero channels change no score and give zero output channels; the kernels want power-of-two tiles.
        q, k, v = (F.pad(x, (0, padded - d)) for x in (q, k, v))
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    if fp8:
        with torch.no_grad():
            out, lse = _fp8_forward(q, k, v, layout, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = _NoBackward.apply(q, k, v, out, lse)
    else:
        out, lse = _sparse_forward(q, k, v, layout, scale)
    return (out[..., :d] if padded != d else out), lse
