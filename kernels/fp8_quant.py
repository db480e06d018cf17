"""Real FP8 (e4m3) quantization for the FP8 kernel: the numerics of ``dit_sparse.fp8``, keeping fp8 tensors.

``dit_sparse.fp8`` returns dequantized values; the kernel needs the float8 tensors and their scales:
q and k one scale per (tile of tokens, head) — stored expanded to one scale per row so any key tile can read
them — k mean-centred over the sequence first, v one scale per (head, channel). This is the PyTorch version, used
on CPU (where PyTorch's exact casts sidestep the interpreter's inexact fp32 -> fp8 ones) and as the twin of the
fused Triton kernels in ``fp8_quant_fused`` that CUDA runs. ``dequantize_rows(*quantize_tiles(x, t))`` equals
``dit_sparse.fp8.quantize_tiles(x, t)`` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_sparse.fp8 import E4M3_MAX, fp8_scale, key_mean
from dit_sparse.layout import num_blocks, pool_tokens

from .config import has_fp8_tensor_cores

FP8 = torch.float8_e4m3fn


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_tiles(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> (fp8 (B, S, H, D) contiguous, scale per row (B, H, S) fp32), one scale per (tile, head)."""
    b, s, h, d = x.shape
    nt = num_blocks(s, tile)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, nt * tile - s)).view(b, nt, tile, h, d)
    scale = fp8_scale(padded.abs().amax(dim=(2, 4), keepdim=True))  # (B, NT, 1, H, 1)
    quant = _cast(padded, scale).view(b, nt * tile, h, d)[:, :s].contiguous()
    rows = scale.expand(b, nt, tile, h, 1).reshape(b, nt * tile, h)[:, :s]
    return quant, rows.permute(0, 2, 1).contiguous()


def quantize_channels(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> (fp8 (B, S, H, D), scale (B, H, D) fp32), one scale per (head, channel).

    Pass ``scale`` to quantize with given scales (pooled values reuse their source's: a mean never exceeds
    the max magnitude it averages, so it stays in range).
    """
    if scale is None:
        scale = channel_scales(x)
    return _cast(x.float(), scale.unsqueeze(1)), scale


def channel_scales(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, D) fp32 per-channel e4m3 scales: max |x| over the sequence (one read, no abs copy)."""
    low, high = torch.aminmax(x, dim=1)
    return fp8_scale(torch.maximum(high.float(), -low.float()))


def dequantize_rows(x8: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """fp8 (B, S, H, D) and (B, H, S) scales -> fp32 (B, S, H, D)."""
    return x8.float() * row_scale.permute(0, 2, 1).unsqueeze(-1)


@dataclass(frozen=True)
class Fp8Inputs:
    """Everything the FP8 kernel reads.

    q8 (B, S, H, D); q_scale (B, H, S). k8 (B, S_ext, H, D): full-resolution rows then pooled levels;
    k_scale (B, H, S_ext); v_scale (B, H, D). v (B, S_ext, H, D): with ``pv_fp8`` the fp8 values viewed over
    (B, H, D, S_ext rounded up to block_k) memory (``sequence_major_fp8``), otherwise
    the per-channel dequantized values in ``v_dtype``. lse_shift (B, H, S): scale * q . mean(k),
    the LSE change mean-centring causes, added back so the LSE stays that of the original scores.
    """

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    lse_shift: torch.Tensor


def sequence_major_fp8(b: int, s: int, h: int, d: int, *, block: int, device) -> torch.Tensor:
    """An fp8 (B, S, H, D) view over (B, H, D, S') memory, S' = S rounded up to ``block``, for v when P.V runs in
    FP8.

    Sequence-contiguous is the operand order FP8 tensor cores want for P.V. The zero rows up to S' let the kernel
    read whole key tiles of a ragged sequence without masks, and S' (a multiple of 16) aligns every channel's row
    for the asynchronous copies that pipeline those reads.
    """
    memory = torch.empty(b, h, d, -(-s // block) * block, device=device, dtype=FP8)
    memory[..., s:].zero_()
    return memory[..., :s].permute(0, 3, 1, 2)


def pooled_lengths(seq: int, max_level: int) -> list[int]:
    """Rows of each level in the extended key/value sequence: full resolution, then each pooled level."""
    return [num_blocks(seq, 2**level) for level in range(max_level + 1)]


def quantize_inputs(q, k, v, block_q: int, block_k: int, max_level: int, scale: float, *, pv_fp8: bool = False,
                    v_dtype=None, fused: bool | None = None) -> Fp8Inputs:
    """Quantize (B, S, H, D) q, k, v for the FP8 kernel; pooled levels are pooled from the dequantized values.

    Pooled keys get their own per-tile scales (a tile = the pooled rows of one key block); pooled values reuse
    the per-channel scales. ``v_dtype`` (default v's dtype) is the 16/32-bit dtype of v when not ``pv_fp8``.
    ``fused`` (default: on GPUs with FP8, sm_89+) runs the Triton kernels of ``fp8_quant_fused`` instead: the
    same bits.
    """
    use_fused = (q.is_cuda and has_fp8_tensor_cores(q.device)) if fused is None else fused
    if use_fused:
        from .fp8_quant_fused import fused_quantize_inputs

        return fused_quantize_inputs(q, k, v, block_q, block_k, max_level, scale, pv_fp8=pv_fp8, v_dtype=v_dtype)
    mean_k = key_mean(k)
    q8, q_scale = quantize_tiles(q, block_q)
    k8, k_scale = quantize_tiles(k.float() - mean_k, block_k)
    v8, v_scale = quantize_channels(v)
    k_parts, ks_parts, v_parts = [k8], [k_scale], [v8]
    if max_level:
        k_deq = dequantize_rows(k8, k_scale)
        v_deq = v8.float() * v_scale.unsqueeze(1)
        for level in range(1, max_level + 1):
            kq, ks = quantize_tiles(pool_tokens(k_deq, level), block_k >> level)
            k_parts.append(kq)
            ks_parts.append(ks)
            v_parts.append(quantize_channels(pool_tokens(v_deq, level), v_scale)[0])
    v_ext = torch.cat(v_parts, 1)
    if pv_fp8:
        v_ext = sequence_major_fp8(*v_ext.shape, block=block_k, device=v.device).copy_(v_ext)
    else:
        v_ext = (v_ext.float() * v_scale.unsqueeze(1)).to(v_dtype or v.dtype)
    lse_shift = scale * torch.einsum("bshd,bhd->bhs", q.float(), mean_k.squeeze(1))
    return Fp8Inputs(q8, q_scale, torch.cat(k_parts, 1), torch.cat(ks_parts, -1).contiguous(), v_ext, v_scale,
                     lse_shift.contiguous())
