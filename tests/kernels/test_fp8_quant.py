"""Host-side FP8 quantization: same numerics as dit_sparse.fp8, real e4m3 tensors, SQNR on realistic inputs."""

import math

import pytest
import torch
from kernel_cases import qkv, random_layout

from dit_sparse.executors.reference import reference_attention
from dit_sparse.fp8 import fake_quantize_qkv, sqnr_db
from dit_sparse.fp8 import quantize_channels as fake_channels
from dit_sparse.fp8 import quantize_tiles as fake_tiles
from dit_sparse.kernels import naive, segments
from dit_sparse.kernels.fp8_quant import FP8, dequantize_rows, quantize_channels, quantize_inputs, quantize_tiles
from dit_sparse.kernels.pool import pooled_bias
from dit_sparse.layout import BlockLayout


@pytest.mark.parametrize("seq,tile", [(63, 16), (200, 64), (317, 128)])
def test_tiles_dequantize_bit_exactly_like_the_emulation(seq, tile):
    x = qkv(2, seq, 3, 32, seed=seq)[0] * 3
    x8, scale = quantize_tiles(x, tile)
    assert x8.dtype == FP8 and scale.shape == (2, 3, seq)
    assert torch.equal(dequantize_rows(x8, scale), fake_tiles(x, tile))


def test_channels_dequantize_bit_exactly_like_the_emulation():
    v = qkv(2, 200, 3, 32)[2] * torch.linspace(0.1, 5, 32)
    v8, scale = quantize_channels(v)
    assert scale.shape == (2, 3, 32)
    assert torch.equal(v8.float() * scale.unsqueeze(1), fake_channels(v))


def fp8_twin(q, k, v, layout, scale, pv_fp8=False):
    f = quantize_inputs(q, k, v, layout.block_q, layout.block_k, layout.max_level, scale, pv_fp8=pv_fp8)
    idx, cnt = segments.level0_lut(layout)
    pooled = [None] * 4
    if layout.max_level:
        seg = segments.pooled_segments(layout)
        pooled = [pooled_bias(layout.seq_len, layout.max_level, q.device), seg.start, seg.length, seg.count]
    return naive.block_sparse_fwd_fp8(f.q8, f.q_scale, f.k8, f.k_scale, f.v, f.v_scale, f.lse_shift, idx, cnt,
                                      *pooled, layout.block_q, layout.block_k, scale, q.dtype)


def test_fp8_twin_reproduces_the_emulation_and_restores_the_lse():
    q, k, v = qkv(2, 200, 2, 32, k_offset=1.0)
    layout = random_layout(200, 64, 64, batch=2, heads=2)
    out, lse = fp8_twin(q, k, v, layout, 0.2)
    emu_out, _ = reference_attention(q, k, v, layout, scale=0.2, fp8=True)
    _, exact_lse = reference_attention(q, k, v, layout, scale=0.2)
    assert (out - emu_out).abs().max() <= 1e-5
    # The LSE is that of the original (uncentred) scores, up to the quantization error.
    assert (lse - exact_lse).abs().max() <= 0.1


@pytest.mark.parametrize("levels", [False, True])
def test_fp8_quantization_sqnr_on_realistic_inputs(levels):
    # Realistic: unit-variance q and k entries (qk-normed DiTs), a shared key offset that centring removes,
    # head dim 64, scores of unit spread.
    d = 64
    q, k, v = qkv(1, 512, 2, d, k_offset=1.0, seed=1)
    layout = random_layout(512, 64, 64, heads=2, density=0.6, levels=levels, seed=1)
    ref, _ = reference_attention(q, k, v, layout)
    out, _ = fp8_twin(q, k, v, layout, 1 / math.sqrt(d))
    assert sqnr_db(ref, out) >= 25.0


def test_centring_leaves_probabilities_unchanged():
    q, k, v = qkv(1, 128, 1, 16, k_offset=4.0)
    kc = k - k.mean(1, keepdim=True)
    layout = BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 128, 64, 64)
    assert (reference_attention(q, k, v, layout)[0] - reference_attention(q, kc, v, layout)[0]).abs().max() < 1e-5
    assert fake_quantize_qkv(q, k, v, 64, 64)[1].mean().abs() < 0.05
