"""`torchrun -m dit_sparse.search` (what `accelerate launch` does): two processes on CPU (gloo) split the
calibration prompts and sum their statistics; the result is the one-process search's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from search_helpers import TINY_TEST_MODEL

from dit_sparse.cli import main
from dit_sparse.zoo.model import build_pipeline

PROMPTS = ["a red circle moving right on a dark background", "a blue square growing on a light background",
           "a green triangle moving up on a dark background"]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    build_pipeline(TINY_TEST_MODEL, seed=0).save_pretrained(str(path))
    return path


def _args(model_dir, prompts, out):
    return ["--model", str(model_dir), "--prompts", str(prompts), "--steps", "3", "--frames", "4", "--height", "32",
            "--width", "32", "--dense-first", "0", "--calib-steps", "2", "--cost", "flop", "--max-error", "0.3",
            "--threads", "1", "--quiet", "--out", str(out)]


def test_two_processes_split_the_prompts_and_match_one_process(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["search", *_args(model_dir, prompts, tmp_path / "one" / "tiny.plan.json")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dit_sparse.search", *_args(model_dir, prompts, tmp_path / "two" / "tiny.plan.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("wrote plan") == 1  # only the first process writes and reports

    one = json.loads((tmp_path / "one" / "tiny.stats.json").read_text())
    two = json.loads((tmp_path / "two" / "tiny.stats.json").read_text())
    assert two["info"]["processes"] == 2 and "processes" not in one["info"]
    assert two["info"]["prompts"] == one["info"]["prompts"] == PROMPTS
    np.testing.assert_allclose(np.array(two["error"]), np.array(one["error"]), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.array(two["density"]), np.array(one["density"]), rtol=1e-4, atol=1e-9)
    assert two["columns"] == one["columns"]  # stripes chosen from the first prompt's attention mass, as in one process
    plan_one = json.loads((tmp_path / "one" / "tiny.plan.json").read_text())
    plan_two = json.loads((tmp_path / "two" / "tiny.plan.json").read_text())
    assert plan_two["modules"] == plan_one["modules"]


def test_more_processes_than_prompts_is_a_clear_error(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dit_sparse.search", *_args(model_dir, prompts, tmp_path / "x.plan.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "2 processes need at least 2 calibration prompts" in proc.stderr
