"""Every strategy's layout against a brute-force, token-by-token definition written independently here."""

import itertools
import math

import pytest
import torch

from dit_sparse.layout import BlockLayout, Grid
from dit_sparse.plan import HeadStrategy
from dit_sparse.strategies import STRATEGIES, BuildContext, get_strategy

GRIDS = [Grid(3, 5, 7), Grid(2, 6, 5), Grid(1, 9, 11)]
BLOCKS = [(16, 16), (8, 24), (32, 8)]


def coords(grid):
    return [(f, y, x) for f in range(grid.frames) for y in range(grid.height) for x in range(grid.width)]


def brute_block_mask(token_ok, seq, bq, bk):
    """A key block is visited when any (query token, key token) pair in the two blocks is allowed."""
    nq, nk = -(-seq // bq), -(-seq // bk)
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(seq):
        for j in range(seq):
            if token_ok(i, j):
                mask[i // bq, j // bk] = True
    return mask


def layout_of(name, grid, bq, bk, q=None, k=None, **params):
    spec = HeadStrategy.make(name, **params)
    return get_strategy(name).layout(spec.param_dict, BuildContext(grid, bq, bk, q, k))


@pytest.mark.parametrize("grid,blocks", list(zip(GRIDS, BLOCKS)))
@pytest.mark.parametrize("window", [(0, 1, 1), (1, 2, 0), (1, 0.25, 0.5), (5, 9, 9)])
def test_diagonal_matches_brute_force(grid, blocks, window):
    bq, bk = blocks
    c = coords(grid)
    half = [v if isinstance(v, int) else int(round(v * n))
            for v, n in zip(window, (grid.frames, grid.height, grid.width))]

    def ok(i, j):
        return all(abs(a - b) <= r for a, b, r in zip(c[i], c[j], half))

    expected = brute_block_mask(ok, grid.num_tokens, bq, bk)
    got = layout_of("diagonal", grid, bq, bk, window=list(window)).block_mask()[0, 0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grid,blocks", list(zip(GRIDS, BLOCKS)))
def test_multi_diagonal_is_the_same_spatial_window_in_every_frame(grid, blocks):
    bq, bk = blocks
    c = coords(grid)

    def ok(i, j):
        return abs(c[i][1] - c[j][1]) <= 1 and abs(c[i][2] - c[j][2]) <= 0

    expected = brute_block_mask(ok, grid.num_tokens, bq, bk)
    got = layout_of("multi_diagonal", grid, bq, bk, window=[1, 0]).block_mask()[0, 0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grid,blocks", list(zip(GRIDS, BLOCKS)))
def test_vertical_stripe_matches_brute_force(grid, blocks):
    bq, bk = blocks
    hw = grid.height * grid.width
    columns = {3, grid.num_tokens - 2}

    def ok(i, j):
        return i == j or j < hw or j < 2 or j in columns

    expected = brute_block_mask(ok, grid.num_tokens, bq, bk)
    got = layout_of("vertical_stripe", grid, bq, bk, first_frames=1, sinks=2,
                    columns=sorted(columns)).block_mask()[0, 0]
    assert torch.equal(got, expected)


def test_dense_visits_everything_and_skip_has_no_layout():
    grid = Grid(3, 5, 7)
    assert bool(layout_of("dense", grid, 16, 8).block_mask().all())
    assert not STRATEGIES["skip"].computes


def _brute_estimate(q, k, bq, bk):
    """Per (b, g, query block, key block): pooled score -> softmax mass, with loops."""
    b_, s, g_, d = q.shape
    nq, nk = -(-s // bq), -(-s // bk)
    mass = torch.zeros(b_, g_, nq, nk, dtype=torch.float64)
    for b, g, i in itertools.product(range(b_), range(g_), range(nq)):
        pq = q[b, i * bq:(i + 1) * bq, g].double().mean(0)
        scores = []
        for j in range(nk):
            keys = k[b, j * bk:(j + 1) * bk, g].double()
            scores.append(float(pq @ keys.mean(0)) / math.sqrt(d) + math.log(keys.shape[0]))
        mass[b, g, i] = torch.tensor(scores).softmax(0)
    return mass


def _brute_similar(x, block, threshold):
    b_, s, g_, _ = x.shape
    nb = -(-s // block)
    out = torch.zeros(b_, g_, nb, dtype=torch.bool)
    for b, g, j in itertools.product(range(b_), range(g_), range(nb)):
        toks = x[b, j * block:(j + 1) * block, g].double()
        mean = toks.mean(0)
        cos = torch.nn.functional.cosine_similarity(toks, mean.unsqueeze(0), dim=-1)
        out[b, g, j] = float(cos.mean()) >= threshold
    return out


def _own(seq, bq, bk):
    nq, nk = -(-seq // bq), -(-seq // bk)
    own = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(seq):
        own[i // bq, i // bk] = True
    return own


def _structured_qk(seq, groups=2, batch=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, seq, groups, d, generator=g)
    drift = torch.linspace(0, 3, seq).view(1, seq, 1, 1)
    q = base * 0.3 + torch.sin(drift * torch.arange(1, d + 1).view(1, 1, 1, d))
    k = (torch.randn(batch, seq, groups, d, generator=g) * 0.3
         + torch.cos(drift * torch.arange(1, d + 1).view(1, 1, 1, d)))
    return q * 2, k * 2


@pytest.mark.parametrize("tau,cap,topk,sim", [(0.5, 1.0, None, -1.0), (0.9, 0.3, None, 0.5), (0.9, 1.0, 2, 0.2)])
def test_block_adaptive_matches_brute_force(tau, cap, topk, sim):
    grid, bq, bk = Grid(3, 5, 7), 16, 8
    seq = grid.num_tokens
    q, k = _structured_qk(seq)
    mass = _brute_estimate(q, k, bq, bk)
    k_sim, q_sim = _brute_similar(k, bk, sim), _brute_similar(q, bq, sim)
    own = _own(seq, bq, bk)
    nq, nk = mass.shape[-2:]
    expected = torch.zeros(2, 2, nq, nk, dtype=torch.bool)
    limit = max(1, math.ceil(cap * nk))
    for b, g, i in itertools.product(range(2), range(2), range(nq)):
        if not q_sim[b, g, i]:
            expected[b, g, i] = True
            continue
        ranked = sorted(range(nk), key=lambda j: -float(mass[b, g, i, j]))
        running = 0.0
        for rank, j in enumerate(ranked):
            chosen = (rank < topk) if topk is not None else (running < tau)
            if chosen and rank < limit:
                expected[b, g, i, j] = True
            running += float(mass[b, g, i, j])
        expected[b, g, i] |= own[i] | ~k_sim[b, g]
    got = layout_of("block_adaptive", grid, bq, bk, q, k, tau=tau, cap=cap, topk=topk, min_similarity=sim).block_mask()
    assert torch.equal(got, expected)


def test_pyramid_levels_match_brute_force():
    grid, bq, bk = Grid(3, 5, 7), 16, 8
    seq = grid.num_tokens
    q, k = _structured_qk(seq, seed=3)
    bands = [0.3, 0.5, 0.7, 0.85]
    sim = 0.3
    mass = _brute_estimate(q, k, bq, bk)
    k_sim, q_sim = _brute_similar(k, bk, sim), _brute_similar(q, bq, sim)
    own = _own(seq, bq, bk)
    nq, nk = mass.shape[-2:]
    expected = torch.full((2, 2, nq, nk), -1, dtype=torch.long)
    for b, g, i in itertools.product(range(2), range(2), range(nq)):
        ranked = sorted(range(nk), key=lambda j: -float(mass[b, g, i, j]))
        running = 0.0
        for j in ranked:
            level = sum(running >= band for band in bands)
            if not q_sim[b, g, i] or own[i, j] or not k_sim[b, g, j]:
                level = 0
            expected[b, g, i, j] = level if level < len(bands) else -1
            running += float(mass[b, g, i, j])
    layout = layout_of("pyramid", grid, bq, bk, q, k, bands=bands, min_similarity=sim)
    assert torch.equal(layout.level_map(), expected)
    assert layout.max_level > 0, "the test should exercise pooled levels"


def test_layout_lookup_table_is_ascending_and_counts_match():
    grid = Grid(3, 5, 7)
    layout = layout_of("diagonal", grid, 16, 8, window=[0, 1, 1])
    mask = layout.block_mask()
    for i in range(layout.num_q_blocks):
        n = int(layout.kv_count[0, 0, i])
        visited = layout.kv_index[0, 0, i, :n].tolist()
        assert visited == sorted(visited)
        assert visited == torch.nonzero(mask[0, 0, i]).flatten().tolist()


def test_layout_rejects_empty_rows():
    with pytest.raises(ValueError, match="between 1 and all"):
        BlockLayout.from_block_mask(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 20, 10, 10)


def test_fraction_windows_scale_with_resolution():
    small = layout_of("diagonal", Grid(2, 8, 8), 8, 8, window=[1, 0.25, 0.25])
    large = layout_of("diagonal", Grid(2, 16, 16), 8, 8, window=[1, 0.25, 0.25])
    assert abs(small.density() - large.density()) < 0.25
    assert large.density() < 1.0


def test_layout_density_is_computed_once_per_layout(monkeypatch):
    mask = torch.tensor([[[[1, 0, 1], [0, 1, 0], [1, 0, 0]]]], dtype=torch.bool)  # 3 query x 3 key blocks
    layout = BlockLayout.from_block_mask(mask, seq_len=300, block_q=128, block_k=128)
    first = layout.density()
    # ragged last blocks (300 = 128 + 128 + 44): visited keys per query row over 300 x 300
    assert first == pytest.approx((128 * (128 + 44) + 128 * 128 + 44 * 128) / 300**2)
    monkeypatch.setattr(BlockLayout, "level_map", lambda self: pytest.fail("density recomputed"))
    assert layout.density() == first
