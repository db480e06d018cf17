"""`torchrun ... -m dit_sparse generate --ulysses N | --ring N` makes the video one process makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _generate(out, *extra, procs=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] \
        if procs else [sys.executable]
    command = [*launcher, "-m", "dit_sparse", "generate", "--steps", "3", "--repeats", "1", "--out", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = _generate(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("mode", [["--ulysses", "2"], ["--ring", "2"]])
def test_generate_under_torchrun_makes_the_single_process_video(tmp_path, one_process, mode):
    done = _generate(tmp_path, *mode, procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["context_parallel"] == {"ulysses": int(mode[1]) if mode[0] == "--ulysses" else 1,
                                          "ring": int(mode[1]) if mode[0] == "--ring" else 1}
    assert report["hardware"]["processes"] == 2
    # the same dense and sparse videos as one process: the same PSNR and SSIM between them, to the last digit
    assert report["psnr"] == one_process["psnr"] and report["ssim"] == one_process["ssim"]
    assert done.stdout.count("psnr") == 1, "rank 0 alone reports"


def test_generate_with_a_degree_but_no_torchrun_says_how_to_start_it(tmp_path):
    done = _generate(tmp_path, "--ulysses", "2")
    assert done.returncode != 0
    assert "torchrun --nproc-per-node 2 -m dit_sparse" in done.stderr


@pytest.mark.parametrize("mode", [["--ulysses", "2"], ["--ring", "2"]])
def test_bench_speed_times_dense_and_the_plan_at_the_same_parallelism(tmp_path, mode):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "dit_sparse", "bench", "speed", "--layers", "1", "--frames", "9", "--height", "96", "--width", "128",
               "--repeats", "1", *mode, "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    parallel = result["context_parallel"]
    assert parallel["processes"] == 2 and parallel[mode[0][2:]] == 2
    # CPU attention in diffusers has no ring: there the dense baseline runs through dit-sparse's dense plan
    assert parallel["dense"] == ("dit-sparse's dense plan" if mode[0] == "--ring" else "diffusers' own attention")
    assert [row["plan"] for row in result["results"]] == ["dense", "diagonal:window=[1,0.125,0.125]"]
    assert all(row["seconds"] > 0 for row in result["results"])
    assert done.stdout.count("fidelity is not measured") == 1, "rank 0 alone reports"
