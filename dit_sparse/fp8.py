"""FP8 (e4m3) tile quantization of q, k, v, emulated on any device as quantize-dequantize.

q and k get one scale per (tile of tokens, head) — the same tiles as the sparse layout — k is mean-centred over
the sequence first (softmax is invariant to it, and it removes the shared offset that wastes fp8 range), v gets
one scale per (head, channel). Values are clamped to +/-448, the e4m3 range.
"""

from __future__ import annotations

import math

import torch

from .layout import num_blocks

E4M3_MAX = 448.0


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, at least 1e-12, as a true division on every device.

    CUDA turns a division by a Python scalar into a multiplication by its rounded reciprocal, one bit off at
    times; dividing by a tensor keeps the IEEE quotient that the fused kernels compute too.
    """
    return (amax / amax.new_full((), E4M3_MAX)).clamp_min(1e-12)


def _qdq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = fp8_scale(amax)
    quant = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return quant.float() * scale


def quantize_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, S, H, D) -> dequantized fp32 with one scale per (tile of tokens, head)."""
    b, s, h, d = x.shape
    nt = num_blocks(s, tile)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, nt * tile - s)).view(b, nt, tile, h, d)
    amax = padded.abs().amax(dim=(2, 4), keepdim=True)
    return _qdq(padded, amax).view(b, nt * tile, h, d)[:, :s]


def quantize_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> dequantized fp32 with one scale per (head, channel)."""
    amax = x.float().abs().amax(dim=1, keepdim=True)
    return _qdq(x.float(), amax)


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, 1, H, D) fp32 mean key over the sequence, the offset that centring removes.

    Every FP8 path (emulation, host quantization, fused kernels) takes it from here, so they centre alike.
    """
    return k.mean(dim=1, keepdim=True, dtype=torch.float32)


def fake_quantize_qkv(q, k, v, block_q: int, block_k: int):
    """The fp8 modifier's numerics: centred k, per-tile q/k scales, per-channel v; returned in fp32."""
    k = k.float() - key_mean(k)
    return quantize_tiles(q, block_q), quantize_tiles(k, block_k), quantize_channels(v)


def centring_lse_shift(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, S) fp32: what centring k removed from every score row, to add back to the LSE.

    Centred scores are q . (k - mean k) * scale, so the true LSE is the centred one plus scale * q . mean(k).
    """
    return scale * torch.einsum("bshd,bhd->bhs", q.float(), key_mean(k).squeeze(1))


def executor_inputs(q, k, v, block_q: int, block_k: int, scale: float | None, fp8: bool):
    """What an executor does first: (q, k, v, scale, lse_shift) with the default scale 1/sqrt(D) and, with `fp8`,
    the fp8 modifier's numerics on q, k, v and the LSE shift that gives back the LSE of the original scores."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not fp8:
        return q, k, v, scale, 0.0
    shift = centring_lse_shift(q, k, scale)
    return (*fake_quantize_qkv(q, k, v, block_q, block_k), scale, shift)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    signal = reference.float().pow(2).mean()
    noise = (reference.float() - approx.float()).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(signal / noise))
