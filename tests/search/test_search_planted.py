"""The planted-pattern test: heads built to attend diagonally, in temporal stripes, to the first frame, densely, or
with zero values; the search must find each head's family (>= 95%) and skip the zero-value heads."""

import time

import numpy as np
import planted
import pytest
import torch

import dit_sparse
from dit_sparse.layout import Grid
from dit_sparse.search import Budget, CalibrationOptions, calibrate, default_candidates, flop_cost, solve

GRID = Grid(8, 4, 8)  # 8 frames of 4 rows x 8 columns; 8-token blocks are one row
BLOCKS = (8, 8)


@pytest.fixture
def planted_model():
    planted.register()
    try:
        yield planted.PlantedTransformer(GRID, layers=3, heads=8).eval()
    finally:
        planted.unregister()


def test_search_finds_every_planted_family(planted_model):
    start = time.perf_counter()
    candidates = default_candidates(GRID, *BLOCKS)
    stats = calibrate(planted_model, planted.runner(planted_model, steps=2), 1, CalibrationOptions(
        num_steps=2, grid=GRID, candidates=candidates, dense_first=0.0, calib_steps=2, block_size=BLOCKS,
        progress=False))
    assert stats.info["calls_per_step"] == 2 and stats.info["sample_steps"] == [0, 1]
    cost = flop_cost(stats.candidates, GRID, *BLOCKS, 8, planted_model.head_dim)
    solution = solve(stats, cost, Budget(max_error=0.02), dense_first=0.0)

    kinds = [k for block in planted_model.blocks for k in block.attn.planted_kinds]
    chosen = [s for name in stats.modules for s in solution.plan.heads_for(name)]
    matches = [planted.FAMILY[k] == s.strategy for k, s in zip(kinds, chosen)]
    assert np.mean(matches) >= 0.95, [(k, s.describe()) for k, s in zip(kinds, chosen)]
    assert all(s.strategy == "skip" for k, s in zip(kinds, chosen) if k == "zero")
    # A zero-value head has no error under any candidate, skip included.
    zero = [(mi, hi) for mi, b in enumerate(planted_model.blocks) for hi, k in enumerate(b.attn.planted_kinds)
            if k == "zero"]
    assert all(np.all(stats.error[mi, hi] == 0) for mi, hi in zero)
    # The sparse choices are (nearly) exact: the planted boxes lie inside their layouts.
    assert solution.metrics["relative_l2_error"] < 1e-3
    assert solution.metrics["density"] < 0.5

    # The plan runs in the model and reproduces the dense output (the planted q and k exist only in the adapter,
    # so dense means the all-dense plan).
    x = torch.randn(1, planted_model.blocks[0].attn.to_q.in_features, GRID.frames, GRID.height, GRID.width)
    outputs = []
    for plan in (dit_sparse.SparsePlan.uniform(planted_model, "dense"), solution.plan):
        dit_sparse.apply(planted_model, plan, executor="reference", block_size=BLOCKS)
        with torch.no_grad():
            outputs.append(planted_model(x))
        dit_sparse.remove(planted_model)
    dense, sparse = outputs
    assert float((sparse - dense).norm() / dense.norm()) < 1e-3
    assert time.perf_counter() - start < 60
