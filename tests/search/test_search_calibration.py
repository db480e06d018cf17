"""Calibration math: candidate outputs on sampled rows are exact, errors are normalised per layer, steps and stale
dynamic layouts follow the processor."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_sparse.attend import TextTokens
from dit_sparse.dense import dense_attention_lse, merge_partials
from dit_sparse.executors.reference import reference_attention
from dit_sparse.layout import Grid
from dit_sparse.search.calibration import CalibrationObserver
from dit_sparse.search.candidates import default_candidates, shared
from dit_sparse.search.errors import CalibrationError
from dit_sparse.search.history import history_steps, previous_step, sample_steps
from dit_sparse.search.partial_sums import dense_output, layout_output, partial_sums
from dit_sparse.state import GenerationState
from dit_sparse.strategies import BuildContext, get_strategy

GRID = Grid(3, 5, 7)  # 105 tokens: 16-token blocks are ragged
BQ = BK = 16


def qkv(seed=0, batch=2, heads=3, dim=16, seq=GRID.num_tokens):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))


def sampled(blocks, seq=GRID.num_tokens):
    rows = blocks[:, None] * BQ + torch.arange(BQ)
    return rows.clamp(max=seq - 1), rows < seq


def assert_rows_close(out, ref, rows, valid):
    ref = ref.permute(0, 2, 1, 3)[:, :, rows]  # (B, H, J, bq, D)
    err = ((out - ref).abs() * valid[None, None, :, :, None]).max()
    assert float(err) < 1e-5


@pytest.mark.parametrize("name,params", [
    ("diagonal", {"window": (1, 1, 1)}),
    ("pyramid", {"bands": (0.3, 0.5, 0.7, 0.9), "min_similarity": -1.0}),
    ("block_adaptive", {"tau": 0.5, "cap": 0.3}),
])
def test_sampled_rows_match_the_reference_executor(name, params):
    q, k, v = qkv()
    strategy = get_strategy(name)
    full = {key: spec.default for key, spec in strategy.params.items()} | params
    layout = strategy.layout(full, BuildContext(GRID, BQ, BK, q, k))
    ref, _ = reference_attention(q, k, v, layout)
    blocks = torch.tensor([0, 2, 6])  # 6 is the ragged last query block
    rows, valid = sampled(blocks)
    sums = partial_sums(q[:, rows], k, v, None, BK, pooled=True)
    out = layout_output(layout.level_map().to(torch.int8)[:, :, blocks], sums)
    assert_rows_close(out, ref, rows, valid)


def test_text_keys_are_always_attended_like_the_processor():
    q, k, v = qkv()
    g = torch.Generator().manual_seed(5)
    kt, vt = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 4, 3, 16, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False  # padded text of the second sample
    layout = get_strategy("diagonal").layout({"window": (0, 1, 1)}, BuildContext(GRID, BQ, BK))
    o, lse = reference_attention(q, k, v, layout)
    ot, lset = dense_attention_lse(q, kt, vt, mask)
    ref, _ = merge_partials(o, lse, ot, lset)
    blocks = torch.arange(7)
    rows, valid = sampled(blocks)
    sums = partial_sums(q[:, rows], k, v, (kt, vt, mask), BK, pooled=False)
    assert_rows_close(layout_output(layout.level_map().to(torch.int8)[:, :, blocks], sums), ref, rows, valid)
    dense, dlse = dense_attention_lse(q, k, v)
    assert_rows_close(dense_output(sums), merge_partials(dense, dlse, ot, lset)[0], rows, valid)


def site(step, name="blocks.0.attn1", branch="cond", grid=GRID):
    return SimpleNamespace(module_name=name, grid=grid, step=step, branch=branch)


def test_errors_are_normalised_by_the_layer_mean_head_energy_and_zero_values_cost_nothing():
    q, k, v = qkv(batch=1, heads=4)
    v[:, :, 2] = 0  # head 2 contributes nothing
    diag = shared("diagonal", window=[0, 1, 1])
    cands = [shared("dense"), shared("skip"), diag]
    obs = CalibrationObserver(["blocks.0.attn1"], 4, cands, BQ, BK, steps=[0], first_sparse_step=0)
    obs(site(0), q, k, v, None)
    err, dens, _ = obs.results()
    dense, _ = dense_attention_lse(q, k, v)
    layout = get_strategy("diagonal").layout({"window": (0, 1, 1)}, BuildContext(GRID, BQ, BK))
    sparse, _ = reference_attention(q, k, v, layout)
    energy = dense.square().sum((0, 1, 3))
    expected = (sparse - dense).square().sum((0, 1, 3)) / energy.mean()
    assert np.allclose(err[0, :, 2], expected.numpy(), rtol=1e-4, atol=1e-7)
    assert np.allclose(err[0, :, 1], (energy / energy.mean()).numpy(), rtol=1e-4)  # skip loses all
    assert np.all(err[0, :, 0] == 0) and np.all(err[0, 2] == 0)
    assert dens[0, 0, 2] == pytest.approx(layout.density()) and np.all(dens[0, :, 1] == 0)
    # Mean over the layer's heads of the normalised errors = the layer's relative squared error.
    layer_rel = float((sparse - dense).square().sum() / dense.square().sum())
    assert err[0, :, 2].mean() == pytest.approx(layer_rel, rel=1e-4)


def test_joint_sequences_score_video_rows_only():
    grid = Grid(2, 4, 4)
    q, k, v = qkv(batch=2, heads=2, seq=6 + grid.num_tokens)
    text = TextTokens(length=6, first=True, mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool())
    cands = [shared("dense"), shared("skip"), shared("diagonal", window=[0, 1, 1])]
    obs = CalibrationObserver(["m"], 2, cands, 8, 8, steps=[3], first_sparse_step=0)
    obs(site(3, "m", grid=grid), q, k, v, text)
    err, _, _ = obs.results()
    assert np.all(np.isfinite(err)) and np.all(err[0, :, 2] > 0) and np.all(err[0, :, 0] == 0)


def test_sample_steps_cover_the_sparse_steps():
    assert sample_steps(20, 0.2, 5) == [4, 8, 12, 15, 19]
    assert sample_steps(4, 0.0, 10) == [0, 1, 2, 3]
    with pytest.raises(CalibrationError, match="no sparse step"):
        sample_steps(10, 1.0, 3)


def test_dynamic_layouts_are_reused_until_the_next_refresh_like_the_processor():
    cands = [shared("dense"), shared("block_adaptive", tau=0.5, cap=0.3)]
    obs = CalibrationObserver(["m"], 3, cands, BQ, BK, steps=[2], first_sparse_step=0, refresh_interval=5)
    q0, k0, v0 = qkv(seed=1, batch=1)
    q2, k2, v2 = qkv(seed=2, batch=1)
    obs(site(0, "m"), q0, k0, v0, None)  # refresh step: layout estimated and kept
    obs(site(2, "m"), q2, k2, v2, None)  # evaluated with the step-0 layout
    fresh = get_strategy("block_adaptive").layout({"tau": 0.5, "cap": 0.3, "topk": None, "min_similarity": 0.3},
                                                 BuildContext(GRID, BQ, BK, q0, k0))
    _, dens, _ = obs.results()
    per_head = fresh.expand(1, 3).level_map()
    from dit_sparse.search.partial_sums import level_density

    assert np.allclose(dens[0, :, 1], level_density(per_head, GRID.num_tokens, BQ, BK)[0].numpy())


def test_long_sequences_are_scored_on_sampled_query_blocks():
    q, k, v = qkv(batch=1, heads=2)
    cands = default_candidates(GRID, BQ, BK)
    full = CalibrationObserver(["m"], 2, cands, BQ, BK, steps=[0], first_sparse_step=0)
    part = CalibrationObserver(["m"], 2, cands, BQ, BK, steps=[0], first_sparse_step=0, max_rows=32,
                               query_blocks=3)
    for obs in (full, part):
        obs(site(0, "m"), q, k, v, None)
    e_full, _, _ = full.results()
    e_part, _, _ = part.results()
    assert np.all(np.isfinite(e_part))
    # Random q, k: sampled rows estimate the same errors (loosely).
    mask = e_full > 0.05
    assert np.all(np.abs(np.log(e_part[mask] / e_full[mask])) < math.log(3))


def test_calibrating_a_joint_attention_model_with_batched_cfg():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tiny_models import cogvideox_inputs, tiny_cogvideox

    from dit_sparse.search import CalibrationOptions, calibrate

    model = tiny_cogvideox()
    grid = Grid(3, 5, 7)

    def run(i, on_step):
        for step, t in enumerate((900, 500, 100)):
            inputs = cogvideox_inputs(batch=2, seed=10 * i + step)  # both CFG branches in one call, as CogVideoX does
            inputs["timestep"] = torch.full((2,), t, dtype=torch.long)
            with model.cache_context("cond_uncond"):
                model(**inputs)
            on_step()

    stats = calibrate(model, run, 1, CalibrationOptions(num_steps=3, grid=grid, dense_first=0.0, calib_steps=2,
                                                        block_size=(16, 16), progress=False))
    assert stats.info["batch"] == 2 and stats.info["branches"] == ["cond_uncond"]
    assert stats.info["calls_per_step"] == 1 and stats.grid == grid
    assert np.all(np.isfinite(stats.error)) and stats.error.shape[:2] == (2, 2)
    dense = [i for i, c in enumerate(stats.candidates) if c.family == "dense"][0]
    assert np.all(stats.error[:, :, dense] == 0)


def test_fp8_candidates_are_scored_with_the_executors_quantisation():
    from dit_sparse.search.candidates import with_fp8
    from dit_sparse.search.cost import flop_cost
    from dit_sparse.search.pipeline_calibration import _keep_faster_fp8

    q, k, v = qkv(batch=1, heads=2)
    plain = shared("diagonal", window=[0, 1, 1])
    cands = [shared("dense"), plain, with_fp8(plain)]
    assert cands[2].fp8 and cands[2].key == "diagonal(window=[0, 1, 1], fp8)"
    obs = CalibrationObserver(["m"], 2, cands, BQ, BK, steps=[0], first_sparse_step=0)
    obs(site(0, "m"), q, k, v, None)
    err, _, _ = obs.results()
    layout = get_strategy("diagonal").layout({"window": (0, 1, 1)}, BuildContext(GRID, BQ, BK))
    dense, _ = dense_attention_lse(q, k, v)
    quantised, _ = reference_attention(q, k, v, layout, fp8=True)
    expected = (quantised - dense).square().sum((0, 1, 3)) / dense.square().sum((0, 1, 3)).mean()
    assert np.allclose(err[0, :, 2], expected.numpy(), rtol=1e-3)
    assert not np.allclose(err[0, :, 2], err[0, :, 1]) and np.allclose(err[0, :, 2], err[0, :, 1], atol=0.1)
    # fp8 variants stay only where the cost model says they are faster.
    cost = flop_cost(cands, GRID, BQ, BK, 2, 16)
    assert _keep_faster_fp8(cands, cost) == cands[:2]
    cost.per_head[cands[2].key] = cost.per_head[plain.key] / 2
    assert _keep_faster_fp8(cands, cost) == cands


def _processor_outputs(spec, steps_qkv, text, refresh_interval):
    """The processor's own outputs (attend) at every step of `steps_qkv` for one strategy on every head."""
    from dit_sparse.attend import AttentionSite, attend
    from dit_sparse.executors import get_executor

    cache, static = GenerationState(), {}
    heads = steps_qkv[0][0].shape[2]
    outs = []
    for step, (q, k, v) in enumerate(steps_qkv):
        site_ = AttentionSite("m", (spec,) * heads, GRID, step, False, refresh_interval, "cond",
                              get_executor("reference", torch.device("cpu")), BQ, BK, cache, static)
        outs.append(attend(q, k, v, site_, text))
    return outs


@pytest.mark.parametrize("with_text", [False, True])
def test_rescaled_candidates_score_the_processor_output_averaged_over_residual_ages(with_text):
    from dit_sparse.plan import HeadStrategy

    text = TextTokens(length=5, first=True, mask=torch.tensor([[1] * 5]).bool()) if with_text else None
    extra = 5 if with_text else 0
    steps_qkv = [qkv(seed=10 + s, batch=1, seq=GRID.num_tokens + extra) for s in range(4)]
    interval = 3
    specs = [HeadStrategy.make("diagonal", window=[0, 1, 1], rescale=True),
             HeadStrategy.make("block_adaptive", tau=0.5, cap=0.3, rescale=True)]
    cands = [shared("dense"), shared("diagonal", window=[0, 1, 1])] + \
        [shared(s.strategy, **{**s.param_dict, "rescale": True}) for s in specs]
    assert [c.rescale for c in cands] == [False, False, True, True]
    obs = CalibrationObserver(["m"], 3, cands, BQ, BK, steps=[3], first_sparse_step=0, refresh_interval=interval)
    for step, (q, k, v) in enumerate(steps_qkv):
        obs(site(step, "m"), q, k, v, text)
    err, _, _ = obs.results()
    video = slice(extra, None)
    dense = dense_attention_lse(*steps_qkv[3])[0] if not with_text else None
    if with_text:  # the reference with text is the processor's dense path
        dense = _processor_outputs(HeadStrategy("dense"), steps_qkv, text, interval)[3]
    dense = dense[:, video]
    energy = dense.square().sum((0, 1, 3)).mean()
    for ci, spec in zip((2, 3), specs):
        # Age a: the processor's output at step 3 with its last refresh at step 3 - a (age 0: dense, no error).
        ages = []
        for age in range(1, interval):
            outs = _processor_outputs(spec, steps_qkv[3 - age:], text, interval)
            ages.append((outs[-1][:, video] - dense).square().sum((0, 1, 3)) / energy)
        expected = sum(ages) / interval
        assert np.allclose(err[0, :, ci], expected.numpy(), rtol=1e-3, atol=1e-7), (spec, err[0, :, ci], expected)
        assert np.all(err[0, :, ci] > 0)
    assert not np.allclose(err[0, :, 2], err[0, :, 1])  # re-scaled and plain are told apart


@pytest.mark.parametrize("with_text", [False, True])
@pytest.mark.parametrize("with_rescaled", [False, True])
def test_reuse_candidates_score_the_processor_output_averaged_over_its_ages(with_text, with_rescaled):
    """`reuse` keeps the processor's output of a refresh (text keys included) for the steps until the next one,
    held or extrapolated through the refresh before; its calibrated error is the processor's output against this
    step's dense output, averaged over ages 0..K-1, with or without re-scaled candidates sharing the history."""
    from dit_sparse.plan import HeadStrategy

    text = TextTokens(length=5, first=True, mask=torch.tensor([[1] * 5]).bool()) if with_text else None
    extra = 5 if with_text else 0
    base = qkv(seed=39, batch=1, seq=GRID.num_tokens + extra)  # steps drift a little, as denoising steps do
    steps_qkv = [tuple(x + 0.1 * s * y for x, y in zip(base, qkv(seed=40 + s, batch=1, seq=GRID.num_tokens + extra)))
                 for s in range(6)]
    interval, last = 3, 5
    specs = [HeadStrategy.make("reuse", extrapolate=False), HeadStrategy.make("reuse")]
    cands = [shared("dense"), shared("skip")] + [shared("reuse", **s.param_dict) for s in specs]
    if with_rescaled:
        cands.append(shared("diagonal", window=[0, 1, 1], rescale=True))
    assert [c.reuses for c in cands] == [False, False, True, True] + [False] * with_rescaled
    obs = CalibrationObserver(["m"], 3, cands, BQ, BK, steps=[last], first_sparse_step=0, refresh_interval=interval)
    for step, (q, k, v) in enumerate(steps_qkv):
        obs(site(step, "m"), q, k, v, text)
    err, _, _ = obs.results()
    video = slice(extra, None)
    dense = _processor_outputs(HeadStrategy("dense"), steps_qkv, text, interval)[last][:, video]
    energy = dense.square().sum((0, 1, 3)).mean()
    for ci, spec in zip((2, 3), specs):
        ages = []
        for age in range(1, interval):
            # The processor refreshing at `last - age` and, one interval before, at `last - age - interval`.
            outs = _processor_outputs(spec, steps_qkv[last - age - interval:], text, interval)
            ages.append((outs[-1][:, video] - dense).square().sum((0, 1, 3)) / energy)
        expected = sum(ages) / interval
        assert np.allclose(err[0, :, ci], expected.numpy(), rtol=1e-3, atol=1e-7), (spec, err[0, :, ci], expected)
        assert np.all(err[0, :, ci] > 0) and np.all(err[0, :, ci] < err[0, :, 1])  # better than skipping, not free
    assert not np.allclose(err[0, :, 2], err[0, :, 3])  # held and extrapolated are told apart


def test_history_reaches_the_steps_that_reuse_extrapolates_from():
    # Refresh every 3 steps from step 4: step 10 may reuse the refreshes at 9 and 8, which extend the lines from
    # 6 and 5; step 5 may reuse 4, the first sparse step, which extends the line from the dense step 3.
    assert history_steps([10], 4, 3) == {9, 8}
    assert history_steps([10], 4, 3, extrapolate=True) == {9, 8, 6, 5}
    assert history_steps([5], 4, 3, extrapolate=True) == {4, 3}
    assert [previous_step(r, 4, 3) for r in (4, 5, 7, 9)] == [3, 4, 4, 6]
    assert previous_step(0, 0, 3) is None  # no warm-up: the first refresh holds


def test_reuse_extrapolates_from_the_last_dense_step_at_its_first_refresh():
    """At the first sparse step the processor keeps the output of the dense step before it; a sampled step one
    step later scores the line through the two."""
    from dit_sparse.plan import HeadStrategy

    steps_qkv = [tuple(x + 0.1 * s * y for x, y in zip(qkv(seed=49, batch=1), qkv(seed=50 + s, batch=1)))
                 for s in range(4)]
    spec = HeadStrategy.make("reuse")
    obs = CalibrationObserver(["m"], 3, [shared("dense"), shared("reuse")], BQ, BK, steps=[3], first_sparse_step=2,
                              refresh_interval=3)
    for step, (q, k, v) in enumerate(steps_qkv):
        obs(site(step, "m"), q, k, v, None)
    err, _, _ = obs.results()
    dense = [dense_attention_lse(q, k, v)[0] for q, k, v in steps_qkv]
    line = dense[2] + (dense[2] - dense[1])  # refresh at 2, from the dense step 1, one step on
    expected = (line - dense[3]).square().sum((0, 1, 3)) / dense[3].square().sum((0, 1, 3)).mean() / 2
    assert np.allclose(err[0, :, 1], expected.numpy(), rtol=1e-3, atol=1e-7)
    # The processor does the same: dense first 2 steps (kept), refresh at 2, extrapolated at 3.
    from dit_sparse.attend import AttentionSite, attend
    from dit_sparse.executors import get_executor

    cache = GenerationState()
    for step, (q, k, v) in enumerate(steps_qkv):
        out = attend(q, k, v, AttentionSite("m", (spec,) * 3, GRID, step, step < 2, 3, "cond",
                                            get_executor("cpu", torch.device("cpu")), BQ, BK, cache, {}))
    assert (out - line).abs().max() < 1e-5


def test_rescaled_candidates_use_no_statistics_from_before_the_first_sparse_step():
    """The plan refreshes at its first sparse step: there a re-scaled candidate is exact, and one step later
    only the age-1 statistics (from the first sparse step) exist, not those of the dense warm-up."""
    cands = [shared("dense"), shared("diagonal", window=[0, 1, 1]), shared("diagonal", window=[0, 1, 1],
                                                                         rescale=True)]
    steps_qkv = [qkv(seed=30 + s, batch=1) for s in range(4)]
    obs = CalibrationObserver(["m"], 3, cands, BQ, BK, steps=[2, 3], first_sparse_step=2, refresh_interval=3)
    for step, (q, k, v) in enumerate(steps_qkv):
        obs(site(step, "m"), q, k, v, None)
    steps, step_err = obs.step_results()
    assert steps == [2, 3] and np.all(step_err[0, 0, :, 2] == 0) and np.all(step_err[0, 0, :, 1] > 0)
    from dit_sparse.plan import HeadStrategy

    spec = HeadStrategy.make("diagonal", window=[0, 1, 1], rescale=True)
    dense = dense_attention_lse(*steps_qkv[3])[0]
    out = _processor_outputs(spec, steps_qkv[2:], None, 3)[-1]
    expected = (out - dense).square().sum((0, 1, 3)) / dense.square().sum((0, 1, 3)).mean() / 2  # ages 0 and 1
    assert np.allclose(step_err[1, 0, :, 2], expected.numpy(), rtol=1e-3, atol=1e-7)


def test_rescaled_statistics_follow_fixed_rows_on_long_sequences():
    """Long sequences score a few query blocks; with re-scaled candidates they stay the same for a module, so that
    statistics kept at one step apply to the rows scored later."""
    from dit_sparse.plan import HeadStrategy

    spec = HeadStrategy.make("diagonal", window=[0, 1, 1], rescale=True)
    cands = [shared("dense"), shared("diagonal", window=[0, 1, 1]),
             shared("diagonal", **{**spec.param_dict, "rescale": True})]
    obs = CalibrationObserver(["m"], 3, cands, BQ, BK, steps=[2], first_sparse_step=0, refresh_interval=3,
                              max_rows=32, query_blocks=2)
    steps_qkv = [qkv(seed=20 + s, batch=1) for s in range(3)]
    for step, (q, k, v) in enumerate(steps_qkv):
        obs(site(step, "m"), q, k, v, None)
    blocks = obs._query_blocks(GRID.num_tokens, salt=1, module=0)
    assert torch.equal(blocks, obs._query_blocks(GRID.num_tokens, salt=1, module=0)) and len(blocks) == 2
    err, _, _ = obs.results()
    rows, valid = sampled(blocks)
    dense = dense_attention_lse(*steps_qkv[2])[0]
    energy = (dense.permute(0, 2, 1, 3)[:, :, rows].square().sum(-1) * valid).sum((0, 2, 3)).mean()
    ages = []
    for age in (1, 2):
        out = _processor_outputs(spec, steps_qkv[2 - age:], None, 3)[-1]
        diff = (out - dense).permute(0, 2, 1, 3)[:, :, rows].square().sum(-1) * valid
        ages.append(diff.sum((0, 2, 3)) / energy)
    assert np.allclose(err[0, :, 2], (sum(ages) / 3).numpy(), rtol=1e-3, atol=1e-7)


def test_default_candidates_add_rescaled_twins_of_the_shared_sparse_ones():
    from dit_sparse.search.candidates import RESCALE_FAMILIES

    cands = default_candidates(GRID, BQ, BK)
    twins = [c for c in cands if c.rescale]
    plain = {c.key for c in cands if not c.rescale}
    assert twins and all(c.family in RESCALE_FAMILIES and not c.per_head and not c.fp8 for c in twins)
    assert {c.key.replace(", rescale)", ")").replace("(rescale)", "") for c in twins} <= plain
    assert len({c.key for c in cands}) == len(cands)
    assert not any(c.rescale for c in default_candidates(GRID, BQ, BK, rescale=False))
    with pytest.raises(CalibrationError, match="re-scaled candidates must be shared and without fp8"):
        from dit_sparse.search.candidates import with_modifier

        CalibrationObserver(["m"], 3, [with_modifier(twins[0], "fp8")], BQ, BK, steps=[0], first_sparse_step=0)
