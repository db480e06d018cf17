"""The fused block statistics (mask estimation) against their PyTorch twin, on odd, ragged shapes."""

import pytest
import torch
from kernel_cases import qkv

from dit_sparse.kernels.block_stats import fused_block_stats, launch_block_stats
from dit_sparse.layout import Grid, num_blocks
from dit_sparse.strategies import BuildContext, get_strategy
from dit_sparse.strategies.block_stats import FUSED, BlockStats, torch_block_stats

CASES = [  # batch, seq, heads, head dim, block: ragged last blocks, a head dim and a block that are not powers of 2
    (2, 63, 3, 32, 64),
    (1, 200, 2, 72, 64),
    (2, 317, 2, 128, 128),
    (1, 200, 1, 16, 48),
]


@pytest.mark.parametrize("batch, seq, heads, dim, block", CASES)
def test_matches_the_pytorch_twin(batch, seq, heads, dim, block, device):
    x = qkv(batch, seq, heads, dim, device=device, seed=seq, k_offset=0.5)[1]
    nb = num_blocks(seq, block)
    out = BlockStats(torch.full((batch, nb, heads, dim), float("nan"), device=device),
                     torch.full((batch, heads, nb), float("nan"), device=device))
    launch_block_stats(x, block, out)  # NaN-filled buffers: an element left unwritten fails
    ref = torch_block_stats(x, block)
    torch.testing.assert_close(out.mean, ref.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.similarity, ref.similarity, atol=1e-5, rtol=0)


def test_strided_low_precision_input(device):
    x = qkv(2, 317, 4, 64, device=device, seed=3, k_offset=1.0)[0].to(torch.bfloat16)[:, :, ::2]  # every other head
    assert not x.is_contiguous()
    ours, ref = fused_block_stats(x, 64), torch_block_stats(x, 64)
    torch.testing.assert_close(ours.mean, ref.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.similarity, ref.similarity, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["block_adaptive", "pyramid"])
def test_dynamic_layouts_are_the_same_with_either(strategy, device, monkeypatch):
    grid = Grid(3, 8, 13)  # 312 tokens: a ragged last block
    q, k, _ = qkv(2, grid.num_tokens, 2, 32, device=device, seed=7, k_offset=1.0)
    ctx = BuildContext(grid, 64, 64, q, k)
    params = {name: p.default for name, p in get_strategy(strategy).params.items()}
    monkeypatch.setitem(FUSED, device.type, fused_block_stats)
    fused = get_strategy(strategy).layout(params, ctx)
    monkeypatch.setitem(FUSED, device.type, torch_block_stats)
    twin = get_strategy(strategy).layout(params, ctx)
    assert torch.equal(fused.block_mask(), twin.block_mask())
    assert torch.equal(fused.level_map(), twin.level_map())


def test_registered_for_cuda():
    assert FUSED["cuda"] is fused_block_stats


def test_bad_input():
    with pytest.raises(ValueError, match="float"):
        fused_block_stats(torch.zeros(1, 8, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="positive"):
        fused_block_stats(torch.zeros(1, 8, 2, 16), 0)
