"""The solver: budgets respected, the binding one reported, infeasible budgets refused, head fusion."""

import itertools
import math

import numpy as np
import pytest

from dit_sparse.layout import Grid
from dit_sparse.plan import ModelFingerprint
from dit_sparse.search.candidates import shared
from dit_sparse.search.cost import CostModel, flop_cost
from dit_sparse.search.solver import (
    Budget,
    BudgetError,
    InfeasibleBudget,
    Problem,
    solve,
)
from dit_sparse.search.stats import CalibrationStats

CANDS = [shared("dense"), shared("skip"), shared("diagonal", window=[0, 0.5, 0.5]),
         shared("diagonal", window=[1, 0.5, 0.5])]


def small_problem(error, per_head, overhead, seed=0, num_steps=10):
    """Stats of `error` (M, H, C) over CANDS, and a cost model with the given per-head times and overheads."""
    m, h, _ = error.shape
    fp = ModelFingerprint("WanTransformer3DModel", m, h, 32)
    density = np.tile(np.array([1.0, 0.0, 0.3, 0.6]), (m, h, 1))
    info = {"num_steps": num_steps, "calls_per_step": 1, "dense_first": 0.0}
    stats = CalibrationStats(fp, [f"blocks.{i}.attn1" for i in range(m)], list(range(m)), Grid(4, 8, 8), 64, 64,
                             CANDS, error, density, {}, info)
    keys = [x.key for x in CANDS]
    cost = CostModel("flop", "dense heads", {k: p for k, p in zip(keys, per_head) if k != "skip"},
                     {k: o for k, o in zip(keys, overhead) if k != "skip"}, {}, {}, (0.0, 1.0), 0.0,
                     h * per_head[0] + overhead[0])
    return stats, cost


def brute_force_min_time(prob: Problem, max_error: float) -> float:
    m, h, c = prob.shape
    best = math.inf
    for combo in itertools.product(range(c), repeat=m * h):
        a = np.array(combo).reshape(m, h)
        if prob.error(a) <= max_error ** 2 + 1e-15:
            best = min(best, prob.total_time(a))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_budget_respected_and_near_optimal(seed):
    rng = np.random.default_rng(seed)
    error = np.zeros((2, 2, 4))
    error[..., 1] = rng.uniform(0.5, 1.0, (2, 2))
    error[..., 2] = rng.uniform(0.0, 0.05, (2, 2))
    error[..., 3] = error[..., 2] * rng.uniform(0.1, 0.5, (2, 2))
    stats, cost = small_problem(error, [1.0, 0.0, 0.35, 0.65], [0.05, 0.0, 0.1, 0.1])
    for max_error in (0.03, 0.08, 0.15):
        sol = solve(stats, cost, Budget(max_error=max_error), dense_first=0.0)
        assert sol.metrics["relative_l2_error"] <= max_error + 1e-9
        prob = Problem(stats, cost, 0.0, ())
        optimum = brute_force_min_time(prob, max_error)
        assert prob.total_time(sol.assign) <= optimum * 1.02 + 1e-12


def test_binding_budget_is_reported(stats):
    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    tight = solve(stats, cost, Budget(max_error=0.05))
    assert "error budget is binding" in tight.binding
    assert tight.metrics["relative_l2_error"] <= 0.05
    loose = solve(stats, cost, Budget(max_error=10.0))
    assert "not binding" in loose.binding
    speed = solve(stats, cost, Budget(target_speedup=2.0))
    assert speed.metrics["attention_speedup"] >= 2.0 - 1e-9
    assert "speedup 2x target is binding" in speed.binding
    dens = solve(stats, cost, Budget(target_density=0.3))
    assert dens.metrics["density"] <= 0.3 + 1e-9
    assert "density" in dens.binding
    # A looser target never costs fidelity.
    looser = solve(stats, cost, Budget(target_speedup=1.5))
    assert looser.metrics["error"] <= speed.metrics["error"] + 1e-12


def test_infeasible_budgets_say_why_and_offer_the_closest_plan(stats):
    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    # 20% dense warm-up steps cap the attention speedup at 5x.
    with pytest.raises(InfeasibleBudget, match=r"cannot reach attention speedup 8x.*dense warm-up") as info:
        solve(stats, cost, Budget(target_speedup=8.0), dense_first=0.2)
    assert info.value.closest.metrics["attention_speedup"] < 8.0
    assert info.value.closest.feasible is False
    with pytest.raises(InfeasibleBudget, match=r"within --max-error 0.001") as info:
        solve(stats, cost, Budget(target_speedup=3.0, max_error=0.001))
    assert info.value.closest.metrics["relative_l2_error"] <= 0.001 + 1e-12
    with pytest.raises(InfeasibleBudget, match="stay dense"):
        solve(stats, cost, Budget(target_density=0.1), dense_layers=(0,))
    with pytest.raises(BudgetError, match="not both"):
        solve(stats, cost, Budget(target_speedup=2.0, target_density=0.3))
    with pytest.raises(BudgetError, match="no covered layer 9"):
        solve(stats, cost, Budget(max_error=0.1), dense_layers=(9,))


def test_head_fusion_merges_a_small_group_when_the_launch_costs_more_than_it_saves():
    error = np.zeros((1, 4, 4))
    error[..., 1] = 1.0  # skipping loses the head
    error[0, 3, 2] = 0.5  # head 3 needs the wider window; the others are exact with either
    per_head = [1.0, 0.0, 0.30, 0.31]
    stats, cost = small_problem(error, per_head, [0.0, 0.0, 0.0, 0.0])
    free = solve(stats, cost, Budget(max_error=0.1), dense_first=0.0)
    assert free.metrics["groups_per_layer"] == [2]  # three narrow heads, one wide
    stats, cost = small_problem(error, per_head, [0.0, 0.0, 0.2, 0.2])  # a launch costs more than it saves
    fused = solve(stats, cost, Budget(max_error=0.1), dense_first=0.0)
    assert fused.metrics["groups_per_layer"] == [1]
    assert {s.describe() for s in fused.plan.heads_for("blocks.0.attn1")} == {CANDS[3].key}
    prob = Problem(stats, cost, 0.0, ())
    assert prob.total_time(fused.assign) == pytest.approx(brute_force_min_time(prob, 0.1))


def test_dense_layers_and_warm_up_are_in_the_plan_and_the_prediction(stats):
    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    sol = solve(stats, cost, Budget(max_error=0.2), dense_first=0.25, dense_layers=(1,))
    plan = sol.plan
    assert plan.schedule.dense_first == 0.25 and plan.schedule.dense_layers == (1,)
    assert all(s.strategy == "dense" for s in plan.heads_for("blocks.1.attn1"))
    no_warmup = solve(stats, cost, Budget(max_error=0.2), dense_first=0.0, dense_layers=(1,))
    assert no_warmup.metrics["attention_speedup"] > sol.metrics["attention_speedup"]
    assert sol.metrics["dense_steps"] == 5 and sol.metrics["executed_density"] > sol.metrics["density"]
    assert plan.calibration["source"] == "dit-sparse search"
    assert sol.frontier and sol.frontier[0]["relative_l2_error"] == 0.0


def test_existing_plans_are_evaluated_from_the_statistics(stats):
    from dit_sparse.plan import HeadStrategy, Schedule, SparsePlan
    from dit_sparse.search.solver import assignment_of, evaluate_plan

    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    sol = solve(stats, cost, Budget(max_error=0.1))
    again = evaluate_plan(stats, cost, sol.plan)
    assert again["relative_l2_error"] == pytest.approx(sol.metrics["relative_l2_error"])
    assert again["attention_speedup"] == pytest.approx(sol.metrics["attention_speedup"])
    # A window written differently but with the same layout at these blocks maps to the calibrated candidate.
    hand = HeadStrategy.make("diagonal", window=[1, 0.5, 0.5])
    plan = SparsePlan(stats.fingerprint, {name: (hand,) * 4 for name in stats.modules},
                      schedule=Schedule(dense_first=0.2, dense_layers=(0,)))
    a = assignment_of(stats, plan)
    assert {stats.candidates[c].key for c in a[1:].ravel()} == {"diagonal(window=[1, 0.125, 0.125])"}
    m = evaluate_plan(stats, cost, plan)
    assert m["head_error"][0] == [0.0] * 4 and m["density"] > 0.25
    with pytest.raises(BudgetError, match="was not calibrated"):
        assignment_of(stats, plan.with_module("blocks.2.attn1", HeadStrategy.make("block_adaptive", tau=0.5)))


def test_layer_sensitivity_weights_the_error_budget(stats):
    from dit_sparse.search.problem import layer_weight_values

    cost = flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    plain = solve(stats, cost, Budget(max_error=0.1))
    stats.info["layer_sensitivity"] = [4.0, 2.0, 1.0, 1.0]
    assert layer_weight_values(stats, "sensitivity").tolist() == [2.0, 1.0, 0.5, 0.5]
    assert layer_weight_values(stats, "none").tolist() == [1.0] * 4
    weighted = solve(stats, cost, Budget(max_error=0.1))
    assert weighted.metrics["layer_weights"] == [2.0, 1.0, 0.5, 0.5]
    assert weighted.plan.calibration["error_weights"] == "layer sensitivity"
    # The insensitive last layers take more of the error budget than without weights, the first no more.
    w_err, p_err = weighted.metrics["layer_relative_l2_error"], plain.metrics["layer_relative_l2_error"]
    assert w_err[0] <= p_err[0] and sum(w_err[2:]) > sum(p_err[2:])
    unweighted = solve(stats, cost, Budget(max_error=0.1), layer_weights="none")
    assert unweighted.metrics["relative_l2_error"] == pytest.approx(plain.metrics["relative_l2_error"])
    with pytest.raises(BudgetError, match="--layer-weights"):
        solve(stats, cost, Budget(max_error=0.1), layer_weights="depth")


def refresh_problem(cands, error, density, extra_times, m=2, h=2):
    """Stats over `cands` (CANDS plus one refreshing candidate) with the same error and density in every head,
    calibrated for 10 steps refreshed every 3, and a flop cost model (dense head 1.0, diagonals 0.3 and 0.6, plus
    `extra_times`)."""
    info = {"num_steps": 10, "calls_per_step": 1, "dense_first": 0.0, "refresh_interval": 3}
    stats = CalibrationStats(ModelFingerprint("WanTransformer3DModel", m, h, 32), [f"blocks.{i}.attn1" for i in
                             range(m)], list(range(m)), Grid(4, 8, 8), 64, 64, cands,
                             np.tile(np.array(error), (m, h, 1)), np.tile(np.array(density), (m, h, 1)), {}, info)
    per_head = {"dense": 1.0, cands[2].key: 0.3, cands[3].key: 0.6, **extra_times}
    cost = CostModel("flop", "dense heads", per_head, {k: 0.0 for k in per_head}, {}, {}, (0.0, 1.0), 0.0, h * 1.0)
    return stats, cost


def test_rescaled_heads_pay_for_their_dense_refreshes(caplog):
    from dit_sparse.search.candidates import with_modifier

    cands = CANDS + [with_modifier(CANDS[2], "rescale")]
    stats, cost = refresh_problem(cands, [0.0, 1.0, 0.05, 0.01, 0.001], [1.0, 0.0, 0.3, 0.6, 0.3],
                                  {cands[4].key: 0.3})
    prob = Problem(stats, cost, 0.0, ())
    # 10 sparse steps refreshed every 3: dense at steps 0, 3, 6, 9, i.e. 0.4 of a dense head on average.
    assert np.allclose(prob.p[..., 4], 0.3 + 0.4) and np.allclose(prob.dens[..., 4], 0.3 + 0.4)
    assert np.allclose(prob.p[..., 2], 0.3)
    later = Problem(stats, cost, 0.2, ())  # 8 sparse steps: refreshes at 2, 5, 8 of them
    assert np.allclose(later.dens[..., 4], 0.3 + 3 / 8)
    sol = solve(stats, cost, Budget(max_error=math.sqrt(0.002)), dense_first=0.0)
    heads = [s for name in stats.modules for s in sol.plan.heads_for(name)]
    assert all(s.rescale and s.strategy == "diagonal" for s in heads)
    assert sol.plan.schedule.refresh_interval == 3
    assert sol.metrics["density"] == pytest.approx(0.7)
    # Errors were measured for a refresh every 3 steps: another interval leaves the re-scaled heads out.
    other = solve(stats, cost, Budget(max_error=math.sqrt(0.002)), dense_first=0.0, refresh_interval=4)
    assert "calibrated with a refresh every 3 steps" in caplog.text
    assert all(s.strategy == "dense" for name in stats.modules for s in other.plan.heads_for(name))


def test_reuse_heads_pay_only_for_their_dense_refreshes(caplog):
    """`reuse` runs nothing between refreshes: its time and density are the refresh share of a dense head."""
    cands = CANDS + [shared("reuse")]
    stats, cost = refresh_problem(cands, [0.0, 1.0, 0.05, 0.01, 0.002], [1.0, 0.0, 0.3, 0.6, 0.0], {})
    prob = Problem(stats, cost, 0.0, ())
    assert np.allclose(prob.p[..., 4], 0.4) and np.allclose(prob.dens[..., 4], 0.4)  # dense at 4 of 10 steps
    sol = solve(stats, cost, Budget(max_error=math.sqrt(0.003)), dense_first=0.0)
    heads = [s for name in stats.modules for s in sol.plan.heads_for(name)]
    assert all(s.strategy == "reuse" for s in heads) and sol.metrics["density"] == pytest.approx(0.4)
    other = solve(stats, cost, Budget(max_error=math.sqrt(0.003)), dense_first=0.0, refresh_interval=4)
    assert "calibrated with a refresh every 3 steps" in caplog.text
    assert not any(s.strategy == "reuse" for name in stats.modules for s in other.plan.heads_for(name))
