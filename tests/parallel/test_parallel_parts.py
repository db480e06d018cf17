"""The parts of context parallelism that need no second process: the Ulysses reordering, the ring's row cut and
need matrix, the cp_plans dit-sparse supplies, and the refusals."""

from __future__ import annotations

import types

import pytest
import torch

import dit_sparse
from dit_sparse.attend import TextTokens
from dit_sparse.executors import get_executor
from dit_sparse.layout import BlockLayout, own_block_mask
from dit_sparse.parallel import ring, ulysses
from dit_sparse.parallel.topology import UnsupportedParallelismError, sequence_parallel


def token_block_mask(layout: BlockLayout) -> torch.Tensor:
    """(B, H, S, S) boolean token mask of a level-0 layout."""
    bm = layout.block_mask()
    rows = torch.arange(layout.seq_len, device=bm.device) // layout.block_q
    cols = torch.arange(layout.seq_len, device=bm.device) // layout.block_k
    return bm[:, :, rows][:, :, :, cols]


@pytest.mark.parametrize("first", [True, False, None])
def test_ulysses_puts_every_ranks_pieces_in_model_order_and_back(first):
    """Rank r holds [text_r, video_r] (or [video_r, text_r]), shards of uneven length as diffusers' *_anything modes
    cut them; gathered, the sequence must read all text, then all video, each in order; and back again."""
    text_lengths, video_lengths = [3, 2, 2], [5, 5, 4]
    text = None if first is None else TextTokens(text_lengths[0], first)
    pieces, t_start, v_start = [], 0, 0
    for t_len, v_len in zip(text_lengths, video_lengths):
        t = torch.arange(t_start, t_start + t_len) + 1000
        v = torch.arange(v_start, v_start + v_len)
        t_start, v_start = t_start + t_len, v_start + v_len
        local = v if text is None else torch.cat([t, v] if first else [v, t])
        pieces.append(local.float().view(1, -1, 1, 1))
    joined, full_text = ulysses.in_model_order(pieces, text, None if text is None else text_lengths)
    t_all, v_all = torch.arange(sum(text_lengths)) + 1000, torch.arange(sum(video_lengths))
    expected = v_all if text is None else torch.cat([t_all, v_all] if first else [v_all, t_all])
    assert torch.equal(joined.flatten(), expected.float())
    if text is not None:
        assert full_text.length == sum(text_lengths) and full_text.first is first
    back = ulysses.in_rank_order(joined, text, None if text is None else text_lengths, video_lengths)
    assert all(torch.equal(a, b) for a, b in zip(back, pieces)) and len(back) == len(pieces)


def _random_layout(seq, bq, bk, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-seq // bq), -(-seq // bk)
    mask = (torch.rand(1, heads, nq, nk, generator=g) < 0.3) | own_block_mask(seq, bq, bk)
    return BlockLayout.from_block_mask(mask, seq, bq, bk)


@pytest.mark.parametrize("executor", ["reference", "cpu"])
@pytest.mark.parametrize("rows", [slice(0, 37), slice(37, 74), slice(74, 111)])
def test_a_layout_cut_to_a_ranks_rows_gives_them_the_whole_layouts_output(executor, rows):
    seq, heads = 111, 2
    q, k, v = (torch.randn(2, seq, heads, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    layout = _random_layout(seq, 16, 8, heads)
    run = get_executor(executor).run
    full_out, full_lse = run(q, k, v, layout)
    cut = ring.rows_only(layout, rows)
    assert ring.rows_only(layout, rows) is cut, "memoised on the layout"
    out, lse = run(q, k, v, cut)
    torch.testing.assert_close(out[:, rows], full_out[:, rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[:, :, rows], full_lse[:, :, rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, seq", [(2, 48), (3, 72), (4, 96), (4, 101)])
def test_the_need_matrix_is_whether_any_row_of_a_rank_visits_a_key_of_another(size, seq):
    from dit_sparse.parallel.topology import split_lengths

    layout = _random_layout(seq, 16, 8, seed=size)
    visits = token_block_mask(layout).flatten(0, 1).any(0)  # (S, S) token pairs any head visits
    lengths = split_lengths(seq, size)  # 101 tokens: uneven shards
    shards = [ring.shard_slice(lengths, r) for r in range(size)]
    expected = torch.zeros(size, size, dtype=torch.bool)
    for dst in range(size):
        # every row of a query block holding one of dst's rows is computed by dst
        first, last = shards[dst].start // 16 * 16, min(-(-shards[dst].stop // 16) * 16, seq)
        for src in range(size):
            expected[dst, src] = bool(visits[first:last, shards[src]].any())
    assert torch.equal(ring.need_matrix(layout, lengths), expected)


def test_ring_traffic_counts_what_a_frame_local_layout_saves_at_wan_480p():
    """Wan 2.1 at 480p (21 x 30 x 52 latent tokens) on a ring of 8, one frame either side: each rank needs its
    neighbours' shards only."""
    from dit_sparse.layout import Grid
    from dit_sparse.strategies import BuildContext, get_strategy

    ctx = BuildContext(Grid(21, 30, 52), 128, 128)
    layout = get_strategy("diagonal").layout({"window": [1, 0.125, 0.125]}, ctx)
    traffic = ring.ring_traffic([layout], 8)
    assert traffic.dense == 56 and traffic.sent < 30 and traffic.saved > 0.45, traffic


def test_context_parallel_plans():
    from tiny_models import tiny_cogvideox, tiny_hunyuan_video, tiny_mochi, tiny_wan

    wan = tiny_wan()
    assert dit_sparse.context_parallel_plan(wan) is type(wan)._cp_plan
    cog = dit_sparse.context_parallel_plan(tiny_cogvideox())
    assert set(cog) == {"transformer_blocks.0", "transformer_blocks.*", "proj_out"}
    hunyuan = dit_sparse.context_parallel_plan(tiny_hunyuan_video())
    assert set(hunyuan) == {"x_embedder", "rope", "proj_out"}, "the video split, the text left whole"
    with pytest.raises(UnsupportedParallelismError, match="MochiTransformer3DModel has no context-parallel plan"):
        dit_sparse.context_parallel_plan(tiny_mochi())
    with pytest.raises(UnsupportedParallelismError, match="Linear has no context-parallel plan"):
        dit_sparse.context_parallel_plan(torch.nn.Linear(2, 2))


def _cp(ulysses=1, ring_degree=1, **flags):
    mesh = types.SimpleNamespace(get_local_rank=lambda: 0, get_group=lambda: None)
    return types.SimpleNamespace(ulysses_degree=ulysses, ring_degree=ring_degree, _ulysses_mesh=mesh,
                                 _ring_mesh=mesh, **flags)


def test_what_cannot_run_is_refused_by_name():
    with pytest.raises(UnsupportedParallelismError, match="Model has 6 attention heads, which ulysses_degree=4"):
        sequence_parallel(_cp(4), 6, "Model")
    unset = types.SimpleNamespace(ulysses_degree=2, ring_degree=1, _ulysses_mesh=None, _ring_mesh=None)
    with pytest.raises(UnsupportedParallelismError, match="enable_parallelism"):
        sequence_parallel(unset, 4, "Model")
    topology = sequence_parallel(_cp(2, 2), 4, "Model")
    assert topology.world == 4 and topology.heads(4) == slice(0, 2) and topology.describe() == "ulysses 2 x ring 2"


def test_shard_lengths_follow_diffusers_split_even_or_not():
    """tensor_split's lengths, as diffusers' *_anything sharder cuts them; ring ranks hold their Ulysses group's."""
    from dit_sparse.parallel.topology import split_lengths

    assert split_lengths(245, 4) == [62, 61, 61, 61] == [len(p) for p in torch.arange(245).tensor_split(4)]
    assert split_lengths(280, 4) == [70] * 4
    topology = sequence_parallel(_cp(2, 2), 4, "Model")  # this rank: ring 0, ulysses 0
    assert topology.ulysses_lengths(245) == [62, 61] and topology.ring_lengths(245) == [123, 122]


def test_balancing_evens_the_ranks_work_and_keeps_each_ranks_head_count():
    from dit_sparse.parallel.balance import balanced_order, rank_costs

    costs = [1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0]  # two dense heads first: rank 0 would do most of the work
    order = balanced_order(costs, 4)
    assert sorted(order) == list(range(8))
    assert rank_costs(costs, tuple(range(8)), 4) == pytest.approx([2.0, 0.2, 0.2, 0.0])
    assert max(rank_costs(costs, order, 4)) == pytest.approx(1.0)  # {1, 0} {1, 0} {.1, .1} {.1, .1}
    assert balanced_order([0.5, 0.5, 0.5, 0.5], 2) == (0, 1, 2, 3), "already even: the model's own order"


def test_the_parallel_report_of_a_mixed_plan_at_wan_480p():
    """Dense heads together in the model's order make one Ulysses rank the busiest; balanced, the ranks even out.
    A frame-local plan on a ring of 4 sends half the shards dense ring attention sends."""
    from diffusers import WanTransformer3DModel

    from dit_sparse.layout import Grid
    from dit_sparse.parallel.report import parallel_report
    from dit_sparse.plan import HeadStrategy

    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=8, attention_head_dim=16, in_channels=4, out_channels=4,
                                      text_dim=8, freq_dim=8, ffn_dim=8, num_layers=2)
    diagonal = HeadStrategy.make("diagonal", window=[1, 0.125, 0.125])
    plan = dit_sparse.SparsePlan.uniform(model, "diagonal", window=[1, 0.125, 0.125])
    mixed = plan
    for name in plan.modules:
        mixed = mixed.with_module(name, [HeadStrategy("dense")] * 2 + [diagonal] * 6)
    grid = Grid(21, 30, 52)
    work = parallel_report(mixed, grid, 128, 128, ulysses=4)["ulysses_rank_work"]
    # in the model's order rank 0 holds both dense heads; balanced, one each (the best 8 heads on 4 ranks allow)
    assert max(work["model_order"]) == work["model_order"][0] >= 4.0
    assert max(work["balanced"]) < 0.6 * max(work["model_order"])
    ring_report = parallel_report(plan, grid, 128, 128, ring=4)
    assert ring_report["ring_shards"] == {"sent": 12, "dense": 24, "saved": 0.5}
    assert parallel_report(mixed, grid, 128, 128, ring=4)["ring_shards"]["saved"] == 0.0  # dense heads need all
