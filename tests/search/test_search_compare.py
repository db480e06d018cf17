"""compare_uniform: one uniform plan per shared candidate, a searched plan at the same predicted density, the
table and files (the end-to-end runs themselves are bench_e2e's, faked here)."""

import json

import numpy as np
from search_helpers import synthetic_stats

from dit_sparse.plan import SparsePlan
from dit_sparse.search import compare_uniform
from dit_sparse.search.solver import evaluate_plan


def test_compare_writes_pairs_at_equal_density(tmp_path, monkeypatch):
    stats = synthetic_stats()
    path = stats.save(tmp_path / "s.stats.json")
    seen = {}

    def fake_run_e2e(model, specs, prompts, num_prompts, seeds, steps, progress=True):
        seen["specs"] = specs
        rows = [{"plan": "dense", "psnr": float("inf"), "executed_density": 1.0, "ssim": 1.0,
                 "caption_accuracy": 0.5, "attention_speedup": 1.0, "speedup": 1.0}]
        for spec in specs:
            searched = "searched" in spec
            rows.append({"plan": spec, "psnr": 30.0 + searched, "executed_density": 0.3, "ssim": 0.9,
                         "caption_accuracy": 0.5, "attention_speedup": 1.5, "speedup": 1.2})
        return {"prompts": num_prompts, "hardware": {"cpus": 2, "torch_threads": 1, "machine": "x86_64"},
                "versions": {"torch": "t", "diffusers": "d"}, "date": "today", "results": rows,
                "weights_id": "0123456789ab"}

    monkeypatch.setattr("dit_sparse.evaluation.run_e2e", fake_run_e2e)
    summary = compare_uniform.compare(path, cost="flop", out=tmp_path / "cmp", prompts=2, progress=False)
    assert summary["weights_id"] == "0123456789ab"  # docs/results.md flags comparisons made on earlier weights
    shared = [c for c in stats.candidates if not c.per_head and c.computes and c.family != "dense"]
    assert len(summary["pairs"]) == len(shared) and len(seen["specs"]) == 2 * len(shared)
    for pair in summary["pairs"]:
        uniform, searched = SparsePlan.load(pair["uniform_plan"]), SparsePlan.load(pair["searched_plan"])
        assert len({s for name in stats.modules for s in uniform.heads_for(name)}) == 1
        assert all(len(searched.heads_for(name)) == stats.fingerprint.num_heads for name in stats.modules)
        assert pair["searched_predicted"]["density"] <= pair["predicted_density"] + 1e-9
        assert pair["searched_predicted"]["relative_l2_error"] <= pair["uniform_predicted"]["relative_l2_error"] + 1e-9
        assert pair["searched_wins"]
    from dit_sparse.search import CostModel, flop_cost  # noqa: F401

    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"at {len(shared)} of {len(shared)} densities" in table
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"]
    assert (tmp_path / "cmp" / "psnr_vs_density.png").read_bytes()[:4] == b"\x89PNG"
    cost = compare_uniform.flop_cost(stats.candidates, stats.grid, 256, 128, 4, 32)
    m = evaluate_plan(stats, cost, SparsePlan.load(summary["pairs"][0]["uniform_plan"]))
    assert np.isclose(m["density"], summary["pairs"][0]["predicted_density"])


def test_pick_by_psnr_picks_every_searched_plan_end_to_end(tmp_path, monkeypatch):
    from dit_sparse.search.solver import Budget, solve
    from dit_sparse.search.validation import Trial, Validation

    stats = synthetic_stats()
    path = stats.save(tmp_path / "s.stats.json")
    picked = []

    def fake_picked(pipe, st, cost, budget, dense_first, **kwargs):
        picked.append((pipe, budget.target_density))
        solution = solve(st, cost, Budget(target_density=budget.target_density), dense_first=dense_first,
                         families=("diagonal",))
        trial = Trial(dense_first, None, solution, "diagonal only", psnr=[25.0])
        return solution, Validation(None, ["p"], [trial], trial)

    def fake_run_e2e(model, specs, prompts, num_prompts, seeds, steps, progress=True):
        rows = [{"plan": s, "psnr": 20.0, "executed_density": 0.3, "ssim": 0.9, "caption_accuracy": 0.5,
                 "attention_speedup": 1.5, "speedup": 1.2} for s in ["dense"] + specs]
        return {"prompts": num_prompts, "hardware": {"cpus": 2, "torch_threads": 1, "machine": "x86_64"},
                "versions": {"torch": "t", "diffusers": "d"}, "date": "today", "results": rows}

    monkeypatch.setattr("dit_sparse.models.load_model", lambda model, device, dtype: "the pipeline")
    monkeypatch.setattr("dit_sparse.search.ladder.picked_solution", fake_picked)
    monkeypatch.setattr("dit_sparse.evaluation.run_e2e", fake_run_e2e)
    summary = compare_uniform.compare(path, cost="flop", out=tmp_path / "cmp", prompts=2, progress=False,
                                      families=["diagonal"], pick_by_psnr=True)
    assert summary["pick_by_psnr"] and len(picked) == len(summary["pairs"]) > 0
    assert all(pipe == "the pipeline" for pipe, _ in picked)
    for pair, (_, density) in zip(summary["pairs"], picked):
        assert density == pair["predicted_density"]
        assert pair["end_to_end_check"]["chosen"]["variant"] == "diagonal only"
        plan = SparsePlan.load(pair["searched_plan"])
        assert {s.strategy for name in stats.modules for s in plan.heads_for(name)} <= {"diagonal", "dense"}
    assert "Searched plans: --pick-by-psnr" in (tmp_path / "cmp" / "compare.md").read_text()
