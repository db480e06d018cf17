"""`dit-sparse bench speed`: a real architecture's config (one layer) with random weights, from the CLI."""

import json
import sys

import pytest

from dit_sparse.cli import checkout_module, main

# Wan 2.1 1.3B, one block, 17 frames of 256x256 -> 5 x 16 x 16 = 1280 video tokens (patch 1x2x2 on the 1/8
# latent): one 256-row query block and two 128-column key blocks per latent frame
SMALL = ["--arch", "wan2.1-1.3b", "--layers", "1", "--frames", "17", "--height", "256", "--width", "256",
         "--repeats", "1"]


def test_bench_speed_writes_dense_and_one_record_per_plan(tmp_path, capsys, monkeypatch):
    out = tmp_path / "speed"
    argv = ["bench", "speed", *SMALL, "--plans", "diagonal:window=[0,1,1]", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/dit-sparse", *argv])  # as the console script runs it
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["command"] == "dit-sparse " + " ".join(argv)  # docs/results.md renders it with the numbers
    assert result["architecture"] == "wan2.1-1.3b" and result["layers"] == 1
    assert result["size"] == {"frames": 17, "height": 256, "width": 256, "video_tokens": 1280}
    dense, sparse = result["results"]
    assert dense["plan"] == "dense" and dense["speedup"] == 1.0 and dense["executed_density"] == 1.0
    assert sparse["plan"] == "diagonal:window=[0,1,1]" and sparse["seconds"] > 0
    assert sparse["speedup"] == pytest.approx(dense["seconds"] / sparse["seconds"])
    assert sparse["executed_density"] == pytest.approx(1 / 5)  # frame-local: 2 of 10 key blocks per query block
    # Kernels are a part of the attention modules, which are a part of the forward.
    for row in (dense, sparse):
        assert 0 < row["kernel_seconds"] < row["attention_seconds"] < row["seconds"] * 1.5
    assert sparse["kernel_speedup"] == pytest.approx(dense["kernel_seconds"] / sparse["kernel_seconds"])
    assert result["compiled"] is False and "kernel_seconds" in result["timers"]
    printed = capsys.readouterr().out
    assert "attention kernels" in printed and "fidelity is not measured" in printed


def test_bench_speed_compiled_times_dense_and_the_plan_under_torch_compile(tmp_path):
    out = tmp_path / "speed"
    assert main(["bench", "speed", *SMALL, "--frames", "5", "--plans", "diagonal:window=[0,1,1]", "--compile",
                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    dense, sparse = result["results"]
    assert result["compiled"] is True and sparse["seconds"] > 0 and dense["seconds"] > 0
    assert result["rounds"] == 1  # compiled: one round per configuration (each activation compiles again)
    assert sparse["executed_density"] == pytest.approx(1 / 2)  # 2 latent frames: own frame of two


def test_bench_speed_bad_input_ends_with_one_clear_line(tmp_path, capsys):
    assert main(["bench", "speed", "--arch", "wan9", "--out", str(tmp_path)]) == 2
    assert "--arch must be one of wan2.1-1.3b, wan2.1-14b, cogvideox-5b, hunyuanvideo" in capsys.readouterr().err
    assert main(["bench", "speed", *SMALL, "--plans", "block_adaptive", "--out", str(tmp_path)]) == 2
    assert "weight-dependent density" in capsys.readouterr().err
    for option, value in (("--frames", "0"), ("--repeats", "0"), ("--layers", "-1")):
        assert main(["bench", "speed", *SMALL, option, value, "--out", str(tmp_path)]) == 2
        assert f"{option} must be positive, got {value}" in capsys.readouterr().err  # not the published default
    assert main(["bench", "speed", *SMALL, "--dtype", "fp64", "--out", str(tmp_path)]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_bench_speed_absurd_size_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    bench_speed = checkout_module("benchmarks.bench_speed")
    monkeypatch.setattr(bench_speed, "build", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["bench", "speed", *SMALL, "--height", "100000", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --height 100000 is not a plausible size (at most 16,384 pixels); is it "
                                       "a typo?\n")


def test_bench_speed_keeps_the_plans_timed_before_a_late_fault(tmp_path, capsys, monkeypatch):
    """results.json is rewritten (atomically, strict JSON) after each plan, marked partial until the last."""
    from dit_sparse.checks import ArgumentError

    bench_speed = checkout_module("benchmarks.bench_speed")

    real, calls = bench_speed._time_forward, []

    def timing(*args):
        calls.append(1)
        if len(calls) == 3:  # the second plan
            raise ArgumentError("a late fault")
        return real(*args)

    monkeypatch.setattr(bench_speed, "_time_forward", timing)
    out = tmp_path / "speed"
    assert main(["bench", "speed", *SMALL, "--plans", "diagonal:window=[0,1,1]", "diagonal:window=[1,1,1]",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: a late fault"
    result = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert [r["plan"] for r in result["results"]] == ["dense", "diagonal:window=[0,1,1]"]
    assert result["partial"] == "1 of 2 plans"


def test_bench_speed_eager_interleaves_its_rounds_and_keeps_each_best(tmp_path, monkeypatch):
    """Eager, each round times dense and then the plan, so a slow spell falls on both; each keeps its best round."""
    from dit_sparse.processor import SparseProcessor

    bench_speed = checkout_module("benchmarks.bench_speed")
    timed = []  # per timed forward: whether the plan was on

    def fake_seconds(run, inputs, device):
        sparse = any(isinstance(p, SparseProcessor) for p in run.attn_processors.values())
        timed.append(sparse)
        # Round 1: dense 2 s, the plan 1 s; round 2: dense 3 s, the plan 0.5 s (the modules' and kernels' forwards of
        # round 1 get these too, and do not count as forward times).
        return {False: 2.0, True: 1.0}[sparse] if len(timed) <= 6 else {False: 3.0, True: 0.5}[sparse]

    monkeypatch.setattr(bench_speed, "_forward_seconds", fake_seconds)
    out = tmp_path / "speed"
    assert SMALL[-2:] == ["--repeats", "1"]
    assert main(["bench", "speed", *SMALL[:-1], "2", "--plans", "diagonal:window=[0,1,1]", "--out", str(out)]) == 0
    # Round 1: dense (timed, modules, kernels), the plan (the same); round 2: dense, then the plan.
    assert timed == [False, False, False, True, True, True, False, True]
    result = json.loads((out / "results.json").read_text())
    assert result["rounds"] == 2 and result["forwards_per_round"] == 1 and "partial" not in result
    dense, sparse = result["results"]
    assert dense["seconds"] == 2.0 and sparse["seconds"] == 0.5 and sparse["speedup"] == 4.0
