"""Fused FP8 (e4m3) quantization of q, k and v for the FP8 kernel: one read of each tensor.

``fp8_quant.quantize_inputs`` in PyTorch makes many passes over fp32 copies (pad, abs, amax, divide, clamp,
cast, permute, dequantize); on an H200 at 32K tokens that took 6.7 ms, more than the FP8 attention itself at 10%
density. Here one program quantizes one (tile of tokens, batch x head): it loads the tile as fp32, centres it
(k), takes its amax for the per-tile scale (q, k) or divides by given per-channel scales (v), and writes e4m3
values, or for v their dequantized 16-bit copies, in whatever strides the FP8 kernel reads. The q pass also
writes the LSE shift that centring k causes (scale * q . mean(k)).

Casts are rounded by hand (round to nearest even on the target's grid, from the fp32 bits) so that the final
conversion is exact: compiled and interpreted runs then write the same bits as PyTorch's casts, which the
tests check bit for bit against ``fp8_quant``.
"""

from __future__ import annotations

import torch

from dit_sparse.fp8 import E4M3_MAX, key_mean
from dit_sparse.layout import num_blocks, pool_tokens

from ._triton import LazyKernel, tl, triton
from .fp8_quant import FP8, Fp8Inputs, channel_scales, pooled_lengths, sequence_major_fp8

# Grids the values are rounded to, as (mantissa bits, smallest exponent): e4m3fn, and the dequantized v's dtypes.
# bf16's smallest exponent is raised to -100 so that the step stays a normal fp32; dequantized values are
# products of an e4m3 value (>= 2^-9 unless 0) and a scale (>= 1e-12), far above 2^-100.
_GRIDS = {FP8: (3, -6), torch.bfloat16: (7, -100), torch.float16: (10, -14)}
FP8_MAX = tl.constexpr(E4M3_MAX)


def _quantize(
    X, MEAN, CHANNEL_SCALE, OUT, ROW_SCALE, SHIFT,
    sxb, sxs, sxh, sxd, sob, sos, soh, sod, srb, srh,
    S, H, D, lse_scale,
    TILE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    CENTRE: tl.constexpr, WITH_SHIFT: tl.constexpr, PER_CHANNEL: tl.constexpr, DEQUANTIZE: tl.constexpr,
    ROUND: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = tl.arange(0, ROWS)
    rows = tile.to(tl.int64) * TILE + offs
    cols = tl.arange(0, COLS)
    row_ok = (offs < TILE) & (rows < S)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + b * sxb + rows[:, None] * sxs + h * sxh + cols[None, :] * sxd, mask=ok, other=0.0)
    x = x.to(tl.float32)
    if WITH_SHIFT or CENTRE:
        mean = tl.load(MEAN + (b * H + h) * D + cols, mask=col_ok, other=0.0)
    if WITH_SHIFT:
        tl.store(SHIFT + b * srb + h * srh + rows, lse_scale * tl.sum(x * mean[None, :], 1), mask=row_ok)
    if CENTRE:
        x = tl.where(ok, x - mean[None, :], 0.0)
    if PER_CHANNEL:
        scale = tl.load(CHANNEL_SCALE + (b * H + h) * D + cols, mask=col_ok, other=1.0)[None, :]
    else:
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), 1e-12)
        tl.store(ROW_SCALE + b * srb + h * srh + rows, tl.zeros([ROWS], tl.float32) + scale, mask=row_ok)
    # NaN stays NaN (Triton's min/max would otherwise return the bound), as in PyTorch's clamp.
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    y = _round_to_grid(y, 3, -6)
    if DEQUANTIZE:
        y = y * scale
        if ROUND:
            y = _round_to_grid(y, MANT, EMIN)
    tl.store(OUT + b * sob + rows[:, None] * sos + h * soh + cols[None, :] * sod, y.to(OUT.dtype.element_ty),
             mask=ok)


def _round_to_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 y to nearest even on the grid of a float with MANT mantissa bits and smallest exponent EMIN.

    Every step is exact in fp32: the exponent comes from the bits, t = |y| / step is a multiplication by a power
    of two, and floor/fraction are exact for t < 2^24.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)
    step = ((exponent - MANT + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - (exponent - MANT)) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(y) * inverse
    whole = tl.floor(t)
    frac = t - whole
    odd = (whole - 2.0 * tl.floor(whole * 0.5)) == 1.0
    rounded = (whole + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)) * step
    return tl.where(bits < 0, -rounded, rounded)


quantize_kernel = LazyKernel(_quantize, helpers=(_round_to_grid,))


def launch_quantize(x: torch.Tensor, out: torch.Tensor, *, tile: int, row_scale: torch.Tensor | None = None,
                    channel_scale: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                    centre: bool = False, shift: torch.Tensor | None = None, lse_scale: float = 0.0) -> None:
    """Quantize x (B, S, H, D) into ``out`` (any strides; e4m3, or 16/32-bit for dequantized values).

    Per tile (``row_scale`` (B, H, S) receives the scale of each row's tile) or per channel (``channel_scale``
    (B, H, D) given). ``mean`` (B, 1, H, D) fp32: subtracted when ``centre``; with ``shift`` (B, H, S), each
    row's ``lse_scale * x . mean`` is written there. ``row_scale`` and ``shift`` must share strides.
    """
    b, s, h, d = x.shape
    per_channel = channel_scale is not None
    if per_channel == (row_scale is not None):
        raise ValueError("pass exactly one of row_scale (per-tile scales) and channel_scale (per-channel scales)")
    dequantize = out.dtype != FP8
    if dequantize and not per_channel:
        raise ValueError("only per-channel (v) quantization writes dequantized values")
    if dequantize and out.dtype not in (*_GRIDS, torch.float32):
        raise ValueError(f"dequantized values are written in fp32, bf16 or fp16, not {out.dtype}")
    rows_out = row_scale if row_scale is not None else shift
    if row_scale is not None and shift is not None and row_scale.stride() != shift.stride():
        raise ValueError("row_scale and shift must share strides")
    if rows_out is not None and rows_out.stride(-1) != 1:
        raise ValueError(f"row_scale and shift must be contiguous along the sequence, got strides {rows_out.stride()}")
    mean = mean.contiguous() if mean is not None else None
    channel_scale = channel_scale.contiguous() if per_channel else None
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    mant, emin = _GRIDS.get(out.dtype, (0, 0))
    rows, cols = triton.next_power_of_2(tile), triton.next_power_of_2(d)
    quantize_kernel[(num_blocks(s, tile), b * h)](
        x, mean if mean is not None else dummy, channel_scale if per_channel else dummy, out,
        row_scale if row_scale is not None else dummy, shift if shift is not None else dummy,
        *x.stride(), *out.stride(), *(rows_out.stride()[:2] if rows_out is not None else (0, 0)),
        s, h, d, float(lse_scale),
        TILE=tile, ROWS=rows, COLS=cols, CENTRE=centre, WITH_SHIFT=shift is not None, PER_CHANNEL=per_channel,
        DEQUANTIZE=dequantize, ROUND=dequantize and out.dtype != torch.float32, MANT=mant, EMIN=emin,
        num_warps=8 if rows * cols >= 128 * 128 else 4,
    )


def fused_quantize_inputs(q, k, v, block_q: int, block_k: int, max_level: int, scale: float, *,
                          pv_fp8: bool = False, v_dtype=None) -> Fp8Inputs:
    """``fp8_quant.quantize_inputs`` in one kernel launch per tensor and pooled level; the same bits."""
    b, s, h, d = q.shape
    device = q.device
    lengths = pooled_lengths(s, max_level)
    s_ext = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    mean_k = key_mean(k)
    q8 = torch.empty(b, s, h, d, device=device, dtype=FP8)
    q_scale = torch.empty(b, h, s, device=device, dtype=torch.float32)
    lse_shift = torch.empty(b, h, s, device=device, dtype=torch.float32)
    launch_quantize(q, q8, tile=block_q, row_scale=q_scale, mean=mean_k, shift=lse_shift, lse_scale=scale)

    k8 = torch.empty(b, s_ext, h, d, device=device, dtype=FP8)
    k_scale = torch.empty(b, h, s_ext, device=device, dtype=torch.float32)
    launch_quantize(k, k8[:, :s], tile=block_k, row_scale=k_scale[..., :s], mean=mean_k, centre=True)

    v_scale = channel_scales(v)
    if pv_fp8:
        v_ext = sequence_major_fp8(b, s_ext, h, d, block=block_k, device=device)
    else:
        v_ext = torch.empty(b, s_ext, h, d, device=device, dtype=v_dtype or v.dtype)
    launch_quantize(v, v_ext[:, :s], tile=block_k, channel_scale=v_scale)

    if max_level:  # pooled levels are pooled from the dequantized level-0 values, as in quantize_inputs
        k_deq = k8[:, :s].float() * k_scale[..., :s].permute(0, 2, 1).unsqueeze(-1)
        v8 = v_ext[:, :s] if pv_fp8 else torch.empty(b, s, h, d, device=device, dtype=FP8)
        if not pv_fp8:
            launch_quantize(v, v8, tile=block_k, channel_scale=v_scale)
        v_deq = v8.float() * v_scale.unsqueeze(1)
        for level in range(1, max_level + 1):
            rows = slice(starts[level], starts[level] + lengths[level])
            launch_quantize(pool_tokens(k_deq, level), k8[:, rows], tile=block_k >> level,
                            row_scale=k_scale[..., rows])
            launch_quantize(pool_tokens(v_deq, level), v_ext[:, rows], tile=block_k, channel_scale=v_scale)
    return Fp8Inputs(q8, q_scale, k8, k_scale, v_ext, v_scale, lse_shift)

