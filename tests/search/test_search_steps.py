"""Per-step errors and step sensitivity: the calibration splits its errors by sampled step, measures how much a
perturbation at each step moves the generated result, and the solver can weight the steps by it."""

import numpy as np
import pytest
import torch

from dit_sparse.search import SearchConfig, search
from dit_sparse.search.cost import flop_cost
from dit_sparse.search.pipeline import pipeline_runner
from dit_sparse.search.problem import step_weight_values
from dit_sparse.search.sensitivity import StepSensitivity, pipeline_output
from dit_sparse.search.solver import Budget, BudgetError, solve
from dit_sparse.search.stats import CalibrationStats, StatsError
from dit_sparse.search.validation import asked_model_first, solver_variants

PROMPT = "a red circle moving right on a dark background"


def with_steps(stats, factors):
    """The synthetic statistics split into sampled steps whose errors are `factors` times the mean error."""
    steps = stats.info["sample_steps"][:len(factors)]
    stats.step_error = {s: stats.error * f for s, f in zip(steps, factors)}
    stats.error = np.mean([stats.error * f for f in factors], axis=0)
    return steps


def test_step_weights_move_the_error_budget_to_the_steps_that_matter(stats):
    early, late = with_steps(stats, [3.0, 0.1])
    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    plain = solve(stats, cost, Budget(max_error=0.1))
    stats.info["step_sensitivity"] = [[early, 0.2], [late, 5.0]]  # errors of the late step matter most
    assert step_weight_values(stats, "sensitivity") == {early: 0.2, late: 5.0}
    assert np.allclose(stats.error_over_steps({early: 0.2, late: 5.0}),
                       (0.2 * stats.step_error[early] + 5.0 * stats.step_error[late]) / 5.2)
    assert np.array_equal(stats.error_over_steps(None), stats.error)
    weighted = solve(stats, cost, Budget(max_error=0.1), step_weights="sensitivity")
    assert weighted.metrics["step_weights"] == [[early, 0.2], [late, 5.0]]
    assert weighted.plan.calibration["step_weights"] == "step sensitivity"
    assert plain.plan.calibration["step_weights"] == "none" and plain.metrics["step_weights"] is None
    # The late step's errors are 30x smaller, so weighting it up lets the same budget buy a faster plan ...
    assert weighted.metrics["attention_speedup"] > plain.metrics["attention_speedup"]
    stats.info["step_sensitivity"] = [[early, 5.0], [late, 0.2]]
    # ... and weighting the early step up a slower one.
    assert solve(stats, cost, Budget(max_error=0.1), step_weights="sensitivity").metrics["attention_speedup"] \
        < plain.metrics["attention_speedup"]


def test_step_weights_need_statistics_that_have_them(stats):
    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    with pytest.raises(BudgetError, match="calibrate again"):
        solve(stats, cost, Budget(max_error=0.1), step_weights="sensitivity")
    with pytest.raises(BudgetError, match="--step-weights must be one of none, sensitivity"):
        solve(stats, cost, Budget(max_error=0.1), step_weights="sigma")
    with_steps(stats, [1.0, 1.0])
    stats.info["step_sensitivity"] = [[4, 1.0], [8, float("nan")]]
    with pytest.raises(BudgetError, match="not all positive"):
        solve(stats, cost, Budget(max_error=0.1), step_weights="sensitivity")
    with pytest.raises(StatsError, match="no per-step errors for steps \\[19\\]"):
        stats.error_over_steps({4: 1.0, 19: 1.0})


def test_per_step_errors_survive_a_round_trip_and_old_files_load_without_them(stats, tmp_path):
    with_steps(stats, [2.0, 0.5])
    back = CalibrationStats.load(stats.save(tmp_path / "s.stats.json"))
    assert sorted(back.step_error) == [4, 8]
    assert np.allclose(back.step_error[4], stats.step_error[4], rtol=1e-5)
    stats.step_error = {}
    old = CalibrationStats.load(stats.save(tmp_path / "old.stats.json"))
    assert old.step_error == {} and not old.has_step_weights()
    with pytest.raises(StatsError, match="step_error of step 4 has shape"):
        CalibrationStats(stats.fingerprint, stats.modules, stats.layers, stats.grid, 256, 128, stats.candidates,
                         stats.error, stats.density, step_error={4: np.zeros(3)})


def test_step_perturbation_touches_its_step_only(tiny_pipe):
    run = pipeline_runner(tiny_pipe, [PROMPT], steps=3, frames=4, height=32, width=32)
    assert run.counts_steps
    reference = pipeline_output(run(0, lambda: None))
    perturb = StepSensitivity(tiny_pipe.transformer, eps=0.05)
    handle = perturb.attach()
    try:
        perturb.start(None)
        assert torch.equal(pipeline_output(run(0, perturb.on_step)), reference)  # no target: nothing changes
        seen = []
        original = perturb._after_call

        def spy(module, args, output):
            perturbed = original(module, args, output)
            seen.append((perturb.step, perturbed is not None))
            return perturbed

        handle.remove()
        handle = tiny_pipe.transformer.register_forward_hook(spy)
        perturb.start(1)
        changed = pipeline_output(run(0, perturb.on_step))
    finally:
        handle.remove()
    # both CFG calls of step 1 were perturbed, no call of steps 0 and 2
    assert seen == [(0, False), (0, False), (1, True), (1, True), (2, False), (2, False)]
    assert not torch.equal(changed, reference)


def test_calibration_splits_errors_by_step_and_measures_each_steps_effect(tiny_pipe, tmp_path):
    result = search(tiny_pipe, SearchConfig(prompts=[PROMPT, "a blue square moving up on a light background"],
                    steps=4, frames=4, height=32, width=32, dense_first=0.0, calib_steps=3, cost="flop",
                    out=tmp_path / "tiny.plan.json", max_error=0.3, progress=False, step_weights="sensitivity"))
    st = result.stats
    steps = st.info["sample_steps"]
    assert len(steps) == 3 and sorted(st.step_error) == steps
    # every sampled step had the same calls, so the plain mean over steps is the overall error
    assert np.allclose(np.mean([st.step_error[s] for s in steps], axis=0), st.error)
    assert not all(np.allclose(st.step_error[steps[0]], st.step_error[s]) for s in steps[1:])
    sens = st.info["step_sensitivity"]
    assert [s for s, _ in sens] == steps and all(np.isfinite(v) and v > 0 for _, v in sens)
    assert result.solution.plan.calibration["step_weights"] == "step sensitivity"
    assert "step sensitivities" in result.paths["report"].read_text()
    back = CalibrationStats.load(result.paths["stats"])
    assert back.has_step_weights() and sorted(back.step_error) == steps


def test_pick_by_psnr_tries_the_step_weighted_error_model_when_the_statistics_have_it():
    names = [n for n, _ in solver_variants(["diagonal"], step_weights=True)]
    assert "all strategies, layer- and step-sensitivity weights" in names
    assert len(solver_variants(["diagonal"])) == len(names) - 1
    ordered = asked_model_first(solver_variants(["diagonal"], True), "sensitivity", "sensitivity")
    assert ordered[0] == ("all strategies, layer- and step-sensitivity weights",
                          {"layer_weights": "sensitivity", "step_weights": "sensitivity"})
    assert len(ordered) == len(names)
    ordered = asked_model_first(solver_variants(["diagonal"]), "none", "sensitivity")  # not among them: added
    assert ordered[0][1] == {"layer_weights": "none", "step_weights": "sensitivity"} and len(ordered) == len(names)
