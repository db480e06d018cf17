"""The Triton forward kernel (interpreter on CPU, compiled on CUDA) against the exact reference, in fp32."""

import math

import pytest
import torch
from kernel_cases import nan_like, nan_past_end, qkv, random_layout, to_device

from dit_sparse.executors.reference import reference_attention
from dit_sparse.kernels import segments
from dit_sparse.kernels.attention import block_sparse_attention
from dit_sparse.kernels.launch import Pooled, launch_forward
from dit_sparse.kernels.pool import pooled_bias, pooled_kv
from dit_sparse.layout import BlockLayout

TOL = 1e-4


def run_kernel(q, k, v, layout, scale, **tiles):
    """Launch on NaN-filled outputs, so an element the kernel does not write fails the comparison."""
    idx, cnt = segments.level0_lut(layout)
    pooled = None
    if layout.max_level:
        kp, vp = pooled_kv(k, v, layout.max_level)
        seg = segments.pooled_segments(layout)
        pooled = Pooled(kp, vp, pooled_bias(layout.seq_len, layout.max_level, q.device), seg.start, seg.length,
                        seg.count)
    b, s, h, _ = q.shape
    out, lse = nan_like(q), nan_like(q, (b, h, s), torch.float32)
    launch_forward(q, k, v, idx, cnt, out, lse, block_q=layout.block_q, block_k=layout.block_k, scale=scale,
                   pooled=pooled, **tiles)
    return out, lse


def check(q, k, v, layout, scale=None, **tiles):
    """Kernel against the reference; ``tiles`` passes block_m, block_n or descriptors to the launcher."""
    scale = scale or 1 / math.sqrt(q.shape[-1])
    out, lse = run_kernel(q, k, v, layout, scale, **tiles)
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=scale)
    assert (out - ref_out).abs().max() <= TOL
    assert (lse - ref_lse).abs().max() <= TOL


@pytest.mark.parametrize("seq", [63, 200, 317])
@pytest.mark.parametrize("levels", [False, True])
@pytest.mark.parametrize("descriptors", [False, True])
def test_random_layouts(seq, levels, descriptors, device):
    q, k, v = qkv(2, seq, 2, 16, device=device, seed=seq)
    check(q, k, v, random_layout(seq, 64, 64, batch=2, heads=2, levels=levels, seed=seq, device=device),
          descriptors=descriptors)


@pytest.mark.parametrize("seq, block_k, block_n", [
    (200, 64, 64),    # one ragged tile of 8 rows
    (200, 128, 32),   # last block: two full tiles, one of 8 rows, one wholly past S
    (317, 128, 64),   # last block: one 61-row tile and one wholly past S
    (192, 128, 64),   # S a whole number of tiles, not of blocks: no masked tile, one skipped
    (255, 64, 16),    # the ragged tile holds 15 of 16 rows
])
@pytest.mark.parametrize("descriptors", [False, True])
def test_only_the_ragged_tile_is_masked(seq, block_k, block_n, descriptors, device):
    q, k, v = qkv(1, seq, 2, 32, device=device, seed=seq + block_n)
    layout = random_layout(seq, 64, block_k, heads=2, density=0.5, seed=seq, device=device)
    check(q, nan_past_end(k), nan_past_end(v), layout, block_n=block_n, descriptors=descriptors)


@pytest.mark.parametrize("descriptors", [False, True])
def test_single_entry_rows_with_and_without_the_ragged_block(descriptors, device):
    # Query block 0 visits only the ragged last key block (44 rows), 1 only block 0, 2 the ragged one after another: the
    # prefetch of the next block id must stop at count, and the peeled tail may follow an empty loop.
    mask = torch.tensor([[[[0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 1, 0]]]], dtype=torch.bool)
    layout = to_device(BlockLayout.from_block_mask(mask, 300, 64, 128), device)
    q, k, v = qkv(1, 300, 1, 32, device=device, seed=9)
    for block_n in (32, 64, 128):
        check(q, nan_past_end(k), nan_past_end(v), layout, block_n=block_n, descriptors=descriptors)


def test_query_blocks_of_two_tiles_and_narrow_key_tiles(device):
    # block_q 128 = two 64-row tiles sharing one table row; block_k 32 = the 32-wide key tile.
    q, k, v = qkv(2, 317, 2, 16, device=device, seed=1)
    check(q, k, v, random_layout(317, 128, 32, batch=2, heads=2, levels=True, seed=1, device=device))


def test_key_blocks_of_two_tiles_with_an_empty_last_tile(device):
    # S = 200, block_k 128: the last key block holds 72 rows, so its second 64-row tile is entirely past S.
    q, k, v = qkv(1, 200, 2, 32, device=device, seed=2)
    check(q, k, v, random_layout(200, 64, 128, heads=2, density=0.7, seed=2, device=device), block_n=64)


@pytest.mark.parametrize("levels", [False, True])
def test_sequence_a_whole_number_of_key_tiles_but_not_of_key_blocks(levels, device):
    # S = 192, block_k 128, 64-wide key tiles: every tile is full except the last block's second one, which lies
    # wholly past S and must still be masked (it is read from beyond the keys, or from the pooled rows).
    q, k, v = qkv(1, 192, 2, 32, device=device, seed=6)
    check(q, k, v, random_layout(192, 64, 128, heads=2, density=0.7, levels=levels, seed=6, device=device),
          block_n=64)


@pytest.mark.parametrize("descriptors", [False, True])
def test_small_tiles_override(descriptors, device):
    q, k, v = qkv(1, 130, 1, 16, device=device, seed=3)
    check(q, k, v, random_layout(130, 64, 64, density=0.6, levels=True, seed=3, device=device),
          block_m=32, block_n=16, descriptors=descriptors)


def test_broadcast_layout_over_batch_and_heads(device):
    q, k, v = qkv(2, 200, 3, 16, device=device, seed=4)
    layout = random_layout(200, 64, 64, seed=4, device=device)
    assert layout.kv_index.shape[:2] == (1, 1)
    check(q, k, v, layout)


def test_dense_layout_and_head_dim_128(device):
    q, k, v = qkv(1, 63, 1, 128, device=device, seed=5)
    layout = to_device(BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 63, 64, 64), device)
    check(q, k, v, layout, scale=0.3)


def test_query_block_with_only_pooled_keys(device):
    # Query block 1 visits no full-resolution block: the first loop is empty and the pooled loop starts cold.
    levels = torch.tensor([[[[0, 1, 2, 2], [3, 3, 1, 2], [0, 0, 0, 0]]]])
    layout = to_device(BlockLayout.from_block_mask(levels >= 0, 150, 64, 48, levels=levels), device)
    q, k, v = qkv(1, 150, 1, 16, device=device, seed=6)
    check(q, k, v, layout)


@pytest.mark.parametrize("descriptors", [False, True])
def test_strided_inputs_from_a_packed_projection(descriptors, device):
    # diffusers-style views: q, k, v slices of one (B, S, 3, H, D) tensor, no copies.
    g = torch.Generator().manual_seed(7)
    packed = torch.randn(2, 200, 3, 2, 32, generator=g).to(device)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    check(q, k, v, random_layout(200, 64, 64, batch=2, heads=2, seed=7, device=device), descriptors=descriptors)


def test_descriptors_fall_back_on_misaligned_rows(device):
    # Rows of 3 heads x 16 fp32 channels with an odd element offset: not 16-byte aligned, so the launcher reads
    # k and v through pointers even when asked for descriptors.
    buf = torch.randn(1, 100, 3 * 16 * 3 + 1, device=device)
    q, k, v = (buf[..., 1 + i * 48:1 + (i + 1) * 48].unflatten(-1, (3, 16)) for i in range(3))
    check(q, k, v, random_layout(100, 64, 64, heads=3, seed=8, device=device), descriptors=True)


def test_public_function_pads_head_dim_48(device):
    q, k, v = qkv(1, 63, 2, 48, device=device, seed=8)
    layout = random_layout(63, 64, 64, heads=2, device=device)
    out, lse = block_sparse_attention(q, k, v, layout)
    ref_out, ref_lse = reference_attention(q, k, v, layout)
    assert out.shape == q.shape
    assert (out - ref_out).abs().max() <= TOL and (lse - ref_lse).abs().max() <= TOL


@pytest.mark.parametrize("dim", [24, 256])
def test_unsupported_head_dims_fail_clearly(dim, device):
    q, k, v = qkv(1, 64, 1, dim, device=device)
    with pytest.raises(ValueError, match="multiples of 16"):
        block_sparse_attention(q, k, v, random_layout(64, 64, 64, device=device))


def test_mismatched_layouts_fail_clearly(device):
    q, k, v = qkv(1, 64, 2, 16, device=device)
    with pytest.raises(ValueError, match="layout is for"):
        block_sparse_attention(q, k, v, random_layout(128, 64, 64, device=device))
    with pytest.raises(ValueError, match="do not broadcast"):
        block_sparse_attention(q, k, v, random_layout(64, 64, 64, heads=3, device=device))


def test_layout_blocks_must_be_multiples_of_16(device):
    q, k, v = qkv(1, 64, 1, 16, device=device)
    layout = to_device(BlockLayout.from_block_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), 64, 8, 8), device)
    with pytest.raises(ValueError, match="multiple of 16"):
        block_sparse_attention(q, k, v, layout)
