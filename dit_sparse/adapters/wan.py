"""Wan 2.1 / 2.2 (both transformers of A14B): video-only self-attention `attn1`, RoPE in the processor."""

from __future__ import annotations

import torch

from . import register_adapter
from .base import LatentGrid, ModelAdapter

# The eager fast path multiplies (x1, x2) pairs as complex numbers on CPU, where PyTorch's vectorised kernel rounds
# each product and each sum on its own, like the stock form: bit for bit the same result. Its scalar remainder may fuse
# a multiply-add (an ulp apart), so the path is taken only when every row of pairs fills whole vectors (16 pairs cover
# AVX-512, AVX2 and NEON), and for the dtypes that have a complex counterpart with CPU kernels.
_COMPLEX = (torch.float32, torch.float64)
_VECTOR_PAIRS = 16


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on (B, S, H, D): WanAttnProcessor's arithmetic, bit for bit.

    Each (x1, x2) pair times (cos, sin) is x1 cos - x2 sin, x1 sin + x2 cos. Eager on CPU at real head sizes it is one
    complex multiply: the stock form's six elementwise passes and two strided writes took 0.39 s per tensor at 32,760
    tokens x 1536 channels on a 2-core CPU, the complex multiply 0.09 s. Elsewhere it is the stock form; compiled,
    inductor fuses that into one loop (it does not generate complex code).
    """
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    if (x.device.type == "cpu" and dtype in _COMPLEX and (x.shape[-1] // 2) % _VECTOR_PAIRS == 0
            and not torch.compiler.is_compiling()):
        pairs = torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2)).contiguous())
        rotation = torch.complex(cos.to(dtype), sin.to(dtype))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@register_adapter
class WanAdapter(ModelAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    covered_pattern = r"blocks\.(\d+)\.attn1"
    latent_grid = LatentGrid((2, 3, 4), lambda config: tuple(config.patch_size))  # (B, C, T, H, W)

    def attention(self, attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None, *,
                  tokens, **kwargs):
        if attention_mask is not None:
            raise ValueError("Wan self-attention with an attention mask is not supported by dit-sparse")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary is not None:
            query, key = apply_wan_rotary(query, *rotary), apply_wan_rotary(key, *rotary)
        out = attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
