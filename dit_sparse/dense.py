"""Dense attention on the best kernel of the device, with the log-sum-exp where a sparse part merges with it.

Without an LSE, `F.scaled_dot_product_attention` picks the backend (cuDNN on Hopper, FlashAttention, ...; a
`torch.nn.attention.sdpa_kernel` context names one). With an LSE, SDPA has no public entry, so the LSE backends
below are tried in order and the first usable one runs: cuDNN, then FlashAttention, then the memory-efficient
kernel, each only where PyTorch's own SDPA switches allow it (so `sdpa_kernel` names them here too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def dense_attention(q, k, v, key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), key_mask (B, Sk) True = attend. Returns (B, Sq, H, D)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


@dataclass(frozen=True)
class LseBackend:
    """A dense kernel that returns the LSE. usable(q, masked) on (B, H, S, D) q; run(q, k, v, bias, scale) ->
    out (B, H, S, D), lse (B, H, S) natural log; bias (B, 1, 1, Sk) additive or None."""

    name: str
    usable: Callable[[torch.Tensor, bool], bool]
    run: Callable


def _half(q) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16)


def _capability(q) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device)


def _cudnn(q, k, v, bias, scale):
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


def _flash(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _efficient(q, k, v, bias, scale):
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False,
                                                                      scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def cpu_flash_attention(q, k, v, bias, scale):
    """PyTorch's fused CPU flash kernel: q (B, H, Sq, D), k/v (B, H, Sk, D), bias additive (B, 1, 1, Sk) or None
    -> out (B, H, Sq, D), lse (B, H, Sq). The CPU executor runs it on gathered key blocks."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                     scale=scale)[:2]


def _math(q, k, v, bias, scale):
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse.unsqueeze(-1)), v.float()).to(q.dtype), lse


# In order of preference; the first usable one runs. cuDNN ran dense attention fastest on an H200 (570 TFLOP/s).
LSE_BACKENDS: tuple[LseBackend, ...] = (
    LseBackend("cudnn", lambda q, masked: q.is_cuda and _half(q) and _capability(q) >= (9, 0)
               and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0 and torch.backends.cuda.cudnn_sdp_enabled(), _cudnn),
    LseBackend("flash", lambda q, masked: q.is_cuda and _half(q) and not masked and _capability(q) >= (8, 0)
               and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and torch.backends.cuda.flash_sdp_enabled(), _flash),
    LseBackend("efficient", lambda q, masked: q.is_cuda, _efficient),
    LseBackend("cpu_flash", lambda q, masked: q.device.type == "cpu"
               and q.dtype in (torch.float32, torch.bfloat16, torch.float16), cpu_flash_attention),
    LseBackend("math", lambda q, masked: True, _math),
)


def lse_backend(q: torch.Tensor, masked: bool) -> LseBackend:
    """The backend dense_attention_lse runs for q (B, H, S, D) with or without a key mask."""
    return next(backend for backend in LSE_BACKENDS if backend.usable(q, masked))


def dense_attention_lse(q, k, v, key_mask: torch.Tensor | None = None, scale: float | None = None):
    """Like dense_attention, plus the LSE (B, H, Sq) in fp32 (natural log, scale included)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        bias = bias[:, None, None, :]
    out, lse = lse_backend(qt, bias is not None).run(qt, kt, vt, bias, scale)
    return out.transpose(1, 2), lse.float()


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exactly combine two softmax-normalised partial attentions over disjoint key sets.

    out_*: (B, S, H, D); lse_*: (B, H, S) fp32. Returns (out, lse) as if both key sets were attended at once.
    """
    out, lse = merge_aligned(out_a, lse_a.transpose(1, 2), out_b, lse_b.transpose(1, 2))
    return out.to(out_a.dtype), lse.transpose(1, 2)


def merge_aligned(out_a, lse_a, out_b, lse_b, *, in_place: bool = False):
    """merge_partials for an LSE laid out like the output without its last dim: out_* (..., D), lse_* (...) fp32.
    Returns the output in fp32 (for accumulating several pieces) and the LSE. in_place: out_a is an fp32 buffer of
    the caller's, scaled and accumulated into rather than copied (the CPU executor merges hundreds of pieces a call)."""
    lse = torch.logaddexp(lse_a, lse_b)
    scale_a = torch.exp(lse_a - lse).unsqueeze(-1)
    out = out_a.mul_(scale_a) if in_place else out_a.float() * scale_a
    out.addcmul_(out_b, torch.exp(lse_b - lse).unsqueeze(-1))
    return out, lse
