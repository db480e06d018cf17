"""End-to-end checks: with `--min-psnr` the budget tightens until a plan reaches the bar; with `--pick-by-psnr` the
plans of several error models that meet a target are generated and the most faithful one is kept."""

import json

import numpy as np
import pytest
import torch
from search_helpers import synthetic_stats

from dit_sparse import SparsePlan, apply, remove
from dit_sparse.cli import main
from dit_sparse.metrics import psnr
from dit_sparse.search import SearchConfig, search
from dit_sparse.search.cost import flop_cost
from dit_sparse.search.errors import SearchError
from dit_sparse.search.solver import Budget, BudgetError, InfeasibleBudget, solve
from dit_sparse.search.validation import candidate_trials, settings_ladder, solver_variants, variant_trials

PROMPTS = ["a red circle moving right on a dark background", "a blue square growing on a light background"]
SETTINGS = dict(steps=4, frames=4, height=32, width=32, dense_first=0.0, calib_steps=2, cost="flop", max_error=0.5,
                progress=False)


def test_ladder_starts_with_the_asked_budget_then_tightens_and_warms_up_longer():
    ladder = settings_ladder(0.1, 0.2)
    assert ladder[0] == (0.2, 0.1)
    assert {e for _, e in ladder} == {0.1, 0.075, 0.05, 0.035, 0.025}
    assert sorted({d for d, _ in ladder}) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert settings_ladder(0.01, 0.45) == [(0.45, 0.01)]


def test_candidates_are_distinct_and_fastest_predicted_first():
    stats = synthetic_stats()
    fp = stats.fingerprint
    cost = flop_cost(stats.candidates, stats.grid, stats.block_q, stats.block_k, fp.num_heads, fp.head_dim)

    def solve_at(first, error):
        return solve(stats, cost, Budget(max_error=error), dense_first=first)

    ladder = settings_ladder(0.2, 0.2)
    trials = candidate_trials(solve_at, ladder)
    speeds = [t.predicted_speedup for t in trials]
    assert speeds == sorted(speeds, reverse=True) and len(trials) > 1
    keys = {(t.solution.metrics["dense_steps"], t.solution.assign.tobytes()) for t in trials}
    assert len(keys) == len(trials) <= len(ladder)
    # a longer warm-up never predicts a faster plan at the same error budget
    first = {(t.dense_first, t.max_error): t.predicted_speedup for t in trials}
    for (d, e), s in first.items():
        if (d + 0.1, e) in first:
            assert first[(round(d + 0.1, 6), e)] <= s + 1e-9


def test_min_psnr_keeps_the_fastest_plan_that_reaches_the_bar(tiny_pipe, tmp_path):
    first = search(tiny_pipe, SearchConfig(prompts=PROMPTS, out=tmp_path / "a.plan.json", min_psnr=1.0, **SETTINGS))
    fastest = first.solution.plan.calibration["end_to_end_check"]["tried"]
    assert len(fastest) == 1  # the asked budget's plan passes a low bar at once
    bar = fastest[0]["mean_psnr"] + 1.0  # ... and fails this one, so the budget must tighten
    result = search(tiny_pipe, SearchConfig(stats=first.paths["stats"], out=tmp_path / "v.plan.json",
                    min_psnr=bar, **{k: v for k, v in SETTINGS.items() if k not in ("steps", "frames", "height",
                                                                                   "width", "calib_steps")}))
    check = result.solution.plan.calibration["end_to_end_check"]
    tried = check["tried"]
    assert len(tried) >= 2 and tried[0] == fastest[0]
    assert check["chosen"] == tried[-1] and check["chosen"]["mean_psnr"] >= bar
    assert all(t["mean_psnr"] < bar for t in tried[:-1])
    speeds = [t["predicted_speedup"] for t in tried]
    assert speeds == sorted(speeds, reverse=True)
    assert "end-to-end check: mean PSNR" in result.solution.binding
    report = result.paths["report"].read_text()
    assert "## End-to-end check (--min-psnr)" in report and "| chosen |" in report
    saved = json.loads(result.paths["plan"].read_text())
    assert saved["calibration"]["end_to_end_check"]["chosen"] == check["chosen"]

    # the reported PSNR is what the saved plan gives when generated again with the same settings and seeds
    plan = SparsePlan.load(result.paths["plan"])
    values = []
    for i, prompt in enumerate(PROMPTS):
        kwargs = dict(prompt=prompt, num_inference_steps=4, num_frames=4, height=32, width=32, output_type="np")
        dense = tiny_pipe(generator=torch.Generator().manual_seed(i), **kwargs).frames[0]
        apply(tiny_pipe, plan)
        try:
            sparse = tiny_pipe(generator=torch.Generator().manual_seed(i), **kwargs).frames[0]
        finally:
            remove(tiny_pipe)
        values.append(min(psnr(dense, sparse), 100.0))
    assert np.mean(values) == pytest.approx(check["chosen"]["mean_psnr"], abs=1e-6)


def test_an_unreachable_psnr_writes_nothing_unless_asked(tiny_pipe, tmp_path):
    out = tmp_path / "v.plan.json"
    settings = dict(SETTINGS, max_error=0.05)
    with pytest.raises(SearchError, match="no plan reached mean PSNR 150 dB.*--allow-closest"):
        search(tiny_pipe, SearchConfig(prompts=PROMPTS[:1], out=out, min_psnr=150.0, **settings))
    assert not out.exists() and not out.with_name("v.report.md").exists()
    result = search(tiny_pipe, SearchConfig(prompts=PROMPTS[:1], out=out, min_psnr=150.0, allow_closest=True,
                    **settings))
    assert result.closest and out.exists()
    assert "closest to --min-psnr 150" in result.solution.binding


def assert_search_refuses(tmp_path, capsys, cases):
    """`dit-sparse search` on saved statistics with each (extra args, message): exit 2, the message, no plan."""
    stats = synthetic_stats().save(tmp_path / "s.stats.json")
    for args, message in cases:
        assert main(["search", "--stats", str(stats), "--cost", "flop", "--quiet",
                     "--out", str(tmp_path / "p.plan.json")] + args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "p.plan.json").exists()


def test_min_psnr_bad_input_is_a_clear_error(tmp_path, capsys):
    assert_search_refuses(tmp_path, capsys, (
        (["--min-psnr", "0"], "--min-psnr must be a PSNR"),
        (["--min-psnr", "30", "--target-speedup", "2"], "use it with --max-error")))


def _flop(stats):
    fp = stats.fingerprint
    return flop_cost(stats.candidates, stats.grid, stats.block_q, stats.block_k, fp.num_heads, fp.head_dim)


def test_a_family_restricted_solve_uses_only_that_family_and_dense():
    stats = synthetic_stats()
    cost = _flop(stats)
    for family in ("diagonal", "vertical_stripe"):
        solution = solve(stats, cost, Budget(target_density=0.5), dense_first=0.2, families=(family,))
        used = {stats.candidates[c].family for c in solution.assign.ravel()}
        assert used <= {family, "dense"} and family in used
        assert solution.metrics["density"] <= 0.5 + 1e-9
    with pytest.raises(BudgetError, match="no candidate of family 'nope' was calibrated"):
        solve(stats, cost, Budget(target_density=0.5), families=("nope",))


def test_variant_trials_drop_infeasible_and_duplicate_plans():
    stats = synthetic_stats()
    cost = _flop(stats)
    calls = []

    def solve_variant(**kwargs):
        calls.append(kwargs)
        if kwargs.get("families") == ("pyramid",):
            raise InfeasibleBudget("no", None)
        return solve(stats, cost, Budget(target_density=0.4), dense_first=0.2,
                     **{k: v for k, v in kwargs.items() if k != "repeat"})

    variants = solver_variants(["diagonal", "pyramid"]) + [("the first again", {"repeat": True})]
    trials = variant_trials(solve_variant, variants, 0.2)
    assert len(calls) == len(variants)
    names = [t.variant for t in trials]
    assert "pyramid only" not in names and "the first again" not in names  # infeasible; same plan as the first
    assert names[0] == "all strategies, layer-sensitivity weights" and "diagonal only" in names
    assert len({t.solution.assign.tobytes() for t in trials}) == len(trials)
    assert all(t.max_error is None and t.dense_first == 0.2 for t in trials)


def test_rescaled_only_plans_are_tried_besides_the_plain_solver():
    from dit_sparse.search.validation import RESCALED_ONLY

    stats = synthetic_stats()
    fp = stats.fingerprint
    cost = flop_cost(stats.candidates, stats.grid, stats.block_q, stats.block_k, fp.num_heads, fp.head_dim)

    def solve_at(first, error, **kwargs):
        return solve(stats, cost, Budget(max_error=error), dense_first=first, **kwargs)

    ladder = settings_ladder(0.2, 0.2)
    trials = candidate_trials(solve_at, ladder, [("", {}), RESCALED_ONLY])
    rescaled = [t for t in trials if t.variant == RESCALED_ONLY[0]]
    assert rescaled and len(trials) > len(rescaled)
    for t in rescaled:
        specs = [s for name in stats.modules for s in t.solution.plan.heads_for(name)]
        assert all(s.rescale or s.strategy in ("dense", "skip") for s in specs)
        assert any(s.rescale for s in specs)
    assert [t.predicted_speedup for t in trials] == sorted((t.predicted_speedup for t in trials), reverse=True)
    assert RESCALED_ONLY in solver_variants(["diagonal"], rescaled=True)
    assert RESCALED_ONLY not in solver_variants(["diagonal"])


def test_reuse_only_plans_are_tried_besides_the_plain_and_rescaled_ones():
    from dit_sparse.search.validation import RESCALED_ONLY, REUSE_ONLY, refreshing_variants

    stats = synthetic_stats()
    fp = stats.fingerprint
    cost = flop_cost(stats.candidates, stats.grid, stats.block_q, stats.block_k, fp.num_heads, fp.head_dim)
    assert refreshing_variants(stats.candidates) == [RESCALED_ONLY, REUSE_ONLY]
    assert refreshing_variants([c for c in stats.candidates if not c.reuses]) == [RESCALED_ONLY]

    def solve_at(first, error, **kwargs):
        return solve(stats, cost, Budget(max_error=error), dense_first=first, **kwargs)

    trials = candidate_trials(solve_at, settings_ladder(0.2, 0.2), [("", {}), REUSE_ONLY])
    reused = [t for t in trials if t.variant == REUSE_ONLY[0]]
    assert reused and len(trials) > len(reused)
    specs = [[s for name in stats.modules for s in t.solution.plan.heads_for(name)] for t in reused]
    assert all(s.strategy in ("dense", "reuse") for plan in specs for s in plan)
    assert any(s.strategy == "reuse" for plan in specs for s in plan)


def test_pick_by_psnr_keeps_the_most_faithful_plan_that_meets_the_target(tiny_pipe, tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "max_error"}
    result = search(tiny_pipe, SearchConfig(prompts=PROMPTS, out=tmp_path / "p.plan.json", target_density=0.5,
                    pick_by_psnr=True, **settings))
    check = result.solution.plan.calibration["end_to_end_check"]
    tried = check["tried"]
    assert check["mode"] == "highest PSNR" and check["min_psnr"] is None and len(tried) >= 2
    assert len({t["variant"] for t in tried}) == len(tried)
    best = max(t["mean_psnr"] for t in tried)
    assert check["chosen"]["mean_psnr"] == best and check["chosen"] in tried
    assert result.solution.metrics["density"] <= 0.5 + 1e-9  # the chosen plan still meets the target
    assert "the highest mean PSNR against dense" in result.solution.binding
    report = result.paths["report"].read_text()
    assert "## End-to-end check (--pick-by-psnr)" in report and report.count("| chosen |") == 1
    assert json.loads(result.paths["plan"].read_text())["calibration"]["end_to_end_check"] == check


def test_pick_by_psnr_bad_input_is_a_clear_error(tmp_path, capsys):
    assert_search_refuses(tmp_path, capsys, (
        (["--pick-by-psnr"], "give --target-speedup or --target-density"),
        (["--pick-by-psnr", "--max-error", "0.1"], "with an error budget, use --min-psnr"),
        (["--min-psnr", "30", "--target-density", "0.3"], "--pick-by-psnr keeps the most")))


def test_dense_clips_are_generated_once_per_cache(monkeypatch):
    from types import SimpleNamespace

    from dit_sparse.search import validation

    calls = []

    def fake_pipe(prompt, generator, **kwargs):
        calls.append(prompt)
        return SimpleNamespace(frames=[np.full((2, 4, 4, 3), generator.initial_seed() / 10.0)])

    monkeypatch.setattr(validation, "apply", lambda pipe, plan, executor=None: None)
    monkeypatch.setattr(validation, "remove", lambda pipe: None)
    stats = synthetic_stats()
    solution = solve(stats, _flop(stats), Budget(target_density=0.4), dense_first=0.2)
    cache = {}
    runs = [validation.validate(fake_pipe, PROMPTS, {}, [validation.Trial(0.2, None, solution)], None,
                                progress=False, dense_cache=cache) for _ in range(2)]
    assert len(calls) == 2 * len(PROMPTS) + len(PROMPTS)  # dense once, then one trial per call
    assert set(cache) == {(p, i) for i, p in enumerate(PROMPTS)}
    assert runs[0].chosen.psnr == runs[1].chosen.psnr
