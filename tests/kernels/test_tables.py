"""Host-side look-up tables and the PyTorch twins (no Triton launch): fast checks of what the kernels read."""

import math

import pytest
import torch
from kernel_cases import qkv, random_layout

from dit_sparse.executors.reference import reference_attention
from dit_sparse.kernels import naive, segments
from dit_sparse.kernels.pool import pooled_bias, pooled_kv
from dit_sparse.layout import BlockLayout


def twin_forward(q, k, v, layout, scale):
    idx, cnt = segments.level0_lut(layout)
    args = [None] * 6
    if layout.max_level:
        seg = segments.pooled_segments(layout)
        kp, vp = pooled_kv(k, v, layout.max_level)
        args = [kp, vp, pooled_bias(layout.seq_len, layout.max_level, q.device), seg.start, seg.length, seg.count]
    return naive.block_sparse_fwd(q, k, v, idx, cnt, *args, layout.block_q, layout.block_k, scale)


@pytest.mark.parametrize("seq", [63, 200, 317])
@pytest.mark.parametrize("levels", [False, True])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 32), (32, 64)])
def test_twin_tables_match_reference(seq, levels, blocks):
    q, k, v = qkv(2, seq, 3, 16)
    layout = random_layout(seq, *blocks, batch=2, heads=3, levels=levels, seed=seq)
    out, lse = twin_forward(q, k, v, layout, 0.25)
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=0.25)
    assert (out - ref_out).abs().max() <= 1e-5
    assert (lse - ref_lse).abs().max() <= 1e-5


def test_level0_lut_of_a_plain_layout_is_the_layout():
    layout = random_layout(200, 64, 64, heads=2)
    idx, cnt = segments.level0_lut(layout)
    assert idx is layout.kv_index and cnt is layout.kv_count


def test_level0_lut_keeps_full_resolution_entries_ascending():
    layout = random_layout(317, 32, 32, batch=2, heads=2, levels=True, density=0.7)
    idx, cnt = segments.level0_lut(layout)
    levels = layout.level_map()
    for b in range(2):
        for h in range(2):
            for qb in range(layout.num_q_blocks):
                want = torch.nonzero(levels[b, h, qb] == 0).flatten().tolist()
                assert idx[b, h, qb, : cnt[b, h, qb]].tolist() == want


def test_pooled_segments_merge_adjacent_blocks_of_a_level():
    # One query block visiting key blocks 1, 2, 3 at level 1 and block 5 at level 2; S = 256, block_k = 32.
    levels = torch.full((1, 1, 1, 8), -1)
    levels[..., [1, 2, 3]] = 1
    levels[..., 5] = 2
    mask = levels >= 0
    layout = BlockLayout.from_block_mask(mask, 256, 256, 32, levels=levels.clamp_min(0))
    seg = segments.pooled_segments(layout)
    assert int(seg.count) == 2
    # Level 1 rows start at 0 in the pooled tensor (16 rows per block); level 2 after the 128 level-1 rows.
    assert seg.start[0, 0, 0, :2].tolist() == [16, 128 + 5 * 8]
    assert seg.length[0, 0, 0, :2].tolist() == [48, 8]


def test_pooled_segments_ragged_last_block():
    # S = 100, block_k = 32: key block 3 holds 4 tokens; at level 3 that is ceil(100 / 8) - 12 = 1 pooled row.
    levels = torch.tensor([[[[0, -1, -1, 3]]]])
    layout = BlockLayout.from_block_mask(levels >= 0, 100, 128, 32, levels=levels.clamp_min(0))
    seg = segments.pooled_segments(layout)
    offset = math.ceil(100 / 2) + math.ceil(100 / 4)
    assert (int(seg.count), int(seg.start[0, 0, 0, 0]), int(seg.length[0, 0, 0, 0])) == (1, offset + 12, 1)


def test_transposed_lut_is_the_transposed_block_mask():
    layout = random_layout(317, 64, 32, batch=2, heads=3, density=0.3)
    idx, cnt = segments.transposed_lut(layout)
    mask = layout.block_mask()
    for b in range(2):
        for h in range(3):
            for kb in range(layout.num_k_blocks):
                want = torch.nonzero(mask[b, h, :, kb]).flatten().tolist()
                assert idx[b, h, kb, : cnt[b, h, kb]].tolist() == want


def test_tables_are_cached_per_layout():
    layout = random_layout(200, 64, 64, levels=True)
    assert segments.cached(layout, "pooled") is segments.cached(layout, "pooled")
    assert segments.cached(layout, "level0") is segments.cached(layout, "level0")


def test_backward_twin_matches_autograd_through_reference():
    q, k, v = qkv(2, 200, 2, 16, seed=3)
    layout = random_layout(200, 64, 32, batch=2, heads=2, density=0.4)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(qr, kr, vr, layout)
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * do).sum() + (lse * dlse).sum()).backward()
    idx, cnt = segments.level0_lut(layout)
    tidx, tcnt = segments.transposed_lut(layout)
    grads = naive.block_sparse_bwd(do, q, k, v, out.detach(), lse.detach(), dlse, idx, cnt, tidx, tcnt,
                                   layout.block_q, layout.block_k, 0.25)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert (got - want).norm() / want.norm() <= 1e-5
