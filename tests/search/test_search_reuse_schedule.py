"""`dit-sparse search --reuse-schedule`: candidate schedules of a uniform `reuse` plan, fastest first, checked end to
end; a schedule's plan runs attention at exactly the steps the schedule says."""

import json
import re

import numpy as np
import pytest
import torch
from tiny_models import tiny_wan_pipeline

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.cli import main
from dit_sparse.search.config import ScheduleSearchConfig
from dit_sparse.search.errors import SearchError
from dit_sparse.search.schedule import ReuseSchedule, ScheduleGrid, schedule_grid
from dit_sparse.search.schedule_search import search_reuse_schedule

PROMPTS = ["a red circle moving right on a dark background", "a blue square growing on a light background"]
SIZE = dict(frames=4, height=32, width=32)


def test_a_schedule_runs_attention_at_its_dense_and_refresh_steps():
    schedule = ReuseSchedule(dense_first_steps=2, dense_last_steps=1, refresh_interval=3, order=2)
    #                                  dense  dense  refresh  -      -      refresh  -      -      refresh  dense
    assert schedule.runs_attention(10) == [True, True, True, False, False, True, False, False, True, True]
    assert schedule.executed_density(10) == pytest.approx(0.6)
    assert ReuseSchedule(1, 0, 2, 1).runs_attention(5) == [True, True, False, True, False]


def test_the_grid_is_fastest_first_and_every_candidate_leaves_a_step_sparse():
    grid = schedule_grid(20)
    densities = [c.executed_density(20) for c in grid]
    assert densities == sorted(densities) and densities[-1] < 1.0
    assert {c.order for c in grid} == {1, 2}
    patterns = [(tuple(c.runs_attention(20)), c.order) for c in grid]
    assert len(set(patterns)) == len(patterns)  # the same steps with the same forecast are one candidate
    # at equal density, more dense last steps come first: the last steps are where reuse costs most
    for a, b in zip(grid, grid[1:]):
        if a.executed_density(20) == b.executed_density(20):
            assert a.dense_last_steps >= b.dense_last_steps


def test_the_default_grid_scales_with_the_step_count():
    at_20 = ScheduleGrid().for_steps(20)
    assert at_20 == ScheduleGrid((1, 2, 3, 4, 5, 6), (0, 1, 2, 3), (2, 3, 4, 5), (2, 1))
    at_50 = ScheduleGrid().for_steps(50)
    # 15% of 50 is 7.5: up to 7 dense first steps
    assert at_50.dense_first_steps == tuple(range(1, 8)) and at_50.refresh_intervals == tuple(range(2, 7))
    assert max(c.refresh_interval for c in schedule_grid(50)) == 6


def test_a_narrowed_grid_holds_only_its_values_and_keeps_its_order_of_orders():
    grid = schedule_grid(50, ScheduleGrid(dense_first_steps=(4, 5), dense_last_steps=(2,), orders=(1, 2)))
    assert {c.dense_first_steps for c in grid} == {4, 5} and {c.dense_last_steps for c in grid} == {2}
    assert {c.refresh_interval for c in grid} == set(range(2, 7))  # not narrowed: the default for 50 steps
    for a, b in zip(grid, grid[1:]):
        if a.runs_attention(50) == b.runs_attention(50):
            assert (a.order, b.order) == (1, 2)  # at equal speed, the order named first is tried first


@pytest.mark.parametrize("grid,message", [
    (dict(dense_first_steps=(0, 2)), "dense first steps (--grid-first) must be whole numbers >= 1"),
    (dict(dense_last_steps=(-1,)), "dense last steps (--grid-last) must be whole numbers >= 0"),
    (dict(refresh_intervals=(1, 3)), "refresh intervals (--grid-refresh) must be whole numbers >= 2"),
    (dict(refresh_intervals=()), "refresh intervals (--grid-refresh) must be whole numbers >= 2"),
    (dict(refresh_intervals=(2.5,)), "refresh intervals (--grid-refresh) must be whole numbers >= 2"),
    (dict(orders=(3,)), "forecast orders (--grid-order) must be among [0, 1, 2]"),
    (dict(orders=(True,)), "forecast orders (--grid-order) must be among [0, 1, 2]"),
])
def test_a_bad_grid_is_a_clear_error(grid, message):
    with pytest.raises(SearchError, match=re.escape(message)):
        ScheduleGrid(**grid)


def test_a_grid_takes_lists_and_numpy_integers_and_holds_plain_int_tuples():
    grid = ScheduleGrid(dense_first_steps=[np.int64(4), 5], refresh_intervals=np.array([3, 4]))
    assert grid.dense_first_steps == (4, 5) and grid.refresh_intervals == (3, 4)
    assert all(type(v) is int for v in grid.dense_first_steps + grid.refresh_intervals)
    assert hash(grid) == hash(ScheduleGrid((4, 5), None, (3, 4)))


def test_a_grid_that_leaves_no_step_sparse_is_a_clear_error(tiny_pipe, tmp_path):
    grid = ScheduleGrid(dense_first_steps=(3,), dense_last_steps=(1,))
    with pytest.raises(SearchError, match="no candidate that leaves a step of 4 sparse"):
        search_reuse_schedule(tiny_pipe, ScheduleSearchConfig(prompts=PROMPTS[:1], min_psnr=20.0, steps=4, grid=grid,
                              out=tmp_path / "s.plan.json", progress=False, **SIZE))


@pytest.mark.parametrize("schedule", [ReuseSchedule(1, 1, 2, 2), ReuseSchedule(2, 0, 3, 1), ReuseSchedule(1, 2, 4, 0)])
def test_a_schedules_plan_computes_attention_exactly_where_the_schedule_says(schedule):
    """On Wan's video-only attn1 a reused module runs none of its projections, so counting its q projections
    counts the steps at which attention ran: two CFG branches per step, except in the first block, whose uncond
    call takes the cond call's output after the first step (both see the same input)."""
    steps = 7
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = schedule.plan(pipe.transformer, steps)
    assert plan.schedule.dense_last_steps == schedule.dense_last_steps
    assert plan.heads_for("blocks.0.attn1")[0].param_dict == {"extrapolate": schedule.order > 0,
                                                               "order": max(schedule.order, 1)}
    calls = []
    for name, module in pipe.transformer.named_modules():
        if name.endswith("attn1.to_q"):
            module.register_forward_hook(lambda *_: calls.append(1))
    processor = dit_sparse.apply(pipe, plan)
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
    pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=4.0, height=64,
         width=80, num_frames=5, output_type="pt", generator=torch.Generator().manual_seed(1))
    dit_sparse.remove(pipe)
    layers, runs = len(pipe.transformer.blocks), sum(schedule.runs_attention(steps))
    assert len(calls) == runs * 2 * layers - (runs - 1)
    assert processor.stats.executed_density == pytest.approx(len(calls) / (steps * 2 * layers))


def test_the_search_keeps_the_fastest_schedule_over_the_bar_and_writes_plan_and_report(tiny_pipe, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "s.plan.json"
    monkeypatch.setattr("sys.argv", ["/venv/bin/dit-sparse", "search", "--reuse-schedule", "--min-psnr", "25"])
    result = search_reuse_schedule(tiny_pipe, ScheduleSearchConfig(prompts=PROMPTS, min_psnr=25.0, steps=4, out=out,
                                   progress=False, **SIZE))
    check = result.plan.calibration["end_to_end_check"]
    tried = check["tried"]
    assert check["chosen"] == tried[-1] and tried[-1]["mean_psnr"] >= 25.0
    assert all(t["mean_psnr"] < 25.0 for t in tried[:-1])  # every faster schedule was tried first and failed
    speeds = [t["predicted_speedup"] for t in tried]
    assert speeds == sorted(speeds, reverse=True)
    loaded = SparsePlan.load(out)
    assert loaded.default.strategy == "reuse" and loaded.calibration["source"] == "dit-sparse search --reuse-schedule"
    report = (tmp_path / "s.report.md").read_text()
    assert "# Reuse schedule search" in report and report.count("| ") >= len(tried)
    command = "dit-sparse search --reuse-schedule --min-psnr 25"  # how the report says it was made
    assert f"Command: `{command}`" in report and loaded.calibration["command"] == command
    assert json.loads(out.read_text())["schedule"]["refresh_interval"] == loaded.schedule.refresh_interval


def test_an_unreachable_bar_is_an_error_unless_the_closest_is_asked_for(tiny_pipe, tmp_path):
    out = tmp_path / "s.plan.json"
    settings = dict(min_psnr=150.0, steps=3, out=out, progress=False, **SIZE)
    with pytest.raises(SearchError, match="no schedule reached mean PSNR 150"):
        search_reuse_schedule(tiny_pipe, ScheduleSearchConfig(prompts=PROMPTS[:1], **settings))
    assert not out.exists()
    result = search_reuse_schedule(tiny_pipe, ScheduleSearchConfig(prompts=PROMPTS[:1], allow_closest=True, **settings))
    assert result.closest and "closest to --min-psnr 150" in result.solution.binding and out.exists()


@pytest.mark.parametrize("args,message", [
    (["--reuse-schedule"], "give --min-psnr"),
    (["--reuse-schedule", "--min-psnr", "-1"], "got -1.0"),
    (["--reuse-schedule", "--min-psnr", "30", "--max-error", "0.1"], "--max-error belong to the per-head search"),
    (["--reuse-schedule", "--min-psnr", "30", "--dense-first", "0.3", "--stats", "x.json"],
     "--dense-first, --stats belong to the per-head search"),
    (["--reuse-schedule", "--min-psnr", "30", "--threads", "0"], "--threads must be >= 1"),
    (["--reuse-schedule", "--min-psnr", "30", "--grid-refresh", "1,3"],
     "refresh intervals (--grid-refresh) must be whole numbers"),
    (["--reuse-schedule", "--min-psnr", "30", "--grid-order", "3"], "forecast orders (--grid-order) must be among"),
    (["--max-error", "0.1", "--grid-first", "3", "--grid-last", "1"],
     "--grid-first, --grid-last: the --grid-* flags apply only to --reuse-schedule"),
])
def test_reuse_schedule_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert main(["search", "--quiet", "--out", str(tmp_path / "p.plan.json")] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.plan.json").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--grid-first", "", "expected at least one number"),
    ("--grid-last", "1,x", "expected comma-separated whole numbers such as 2,3,4, got '1,x'"),
])
def test_a_grid_flag_that_is_not_a_list_of_numbers_is_a_usage_error(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--reuse-schedule", "--min-psnr", "30", flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_too_few_steps_is_a_clear_error(tiny_pipe, tmp_path):
    with pytest.raises(SearchError, match="at least 2 denoising steps"):
        search_reuse_schedule(tiny_pipe, ScheduleSearchConfig(prompts=PROMPTS[:1], min_psnr=20.0, steps=1,
                              out=tmp_path / "s.plan.json", progress=False, **SIZE))


def test_the_grid_flags_reach_the_search(monkeypatch, tmp_path, capsys):
    import dit_sparse.search.schedule_search as schedule_search

    seen = {}

    def fake_search(model, config):
        seen.update(vars(config))
        raise SearchError("stopped by the test")

    monkeypatch.setattr(schedule_search, "search_reuse_schedule", fake_search)
    args = ["search", "--quiet", "--reuse-schedule", "--min-psnr", "30", "--steps", "50", "--grid-first", "4,5",
            "--grid-last", "2", "--grid-order", "2", "--out", str(tmp_path / "p.plan.json")]
    assert main(args) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert seen["grid"] == ScheduleGrid(dense_first_steps=(4, 5), dense_last_steps=(2,), orders=(2,))
