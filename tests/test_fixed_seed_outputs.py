"""Fixed-seed outputs stay bit for bit: `dit-sparse generate` on the embedded tiny-shapes model (dense and sparse
videos, for a static, a dynamic and a reuse plan) and a tiny-shapes search re-solved from saved statistics (the plan
file). Refactors must not move them; a change that means to move them re-records the fixture on purpose:

    DIT_SPARSE_RECORD_FIXED_SEED=1 python -m pytest tests/test_fixed_seed_outputs.py

The digests are of decoded frames and of the plan's JSON, taken on the CI machine (x86-64 CPU, torch's CPU build);
another CPU may round differently.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from dit_sparse.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "fixed_seed_outputs.json"
RECORD = os.environ.get("DIT_SPARSE_RECORD_FIXED_SEED") == "1"
SIZE = ["--steps", "4", "--frames", "4", "--height", "32", "--width", "32", "--seed", "3", "--repeats", "1"]
PLANS = {"diagonal": "diagonal", "adaptive": "block_adaptive", "default": "default", "reuse": "reuse"}


def _digest(array) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def _check(key: str, digest: str) -> None:
    recorded = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    if RECORD:
        recorded[key] = digest
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert key in recorded, f"no recorded digest for {key}: record with DIT_SPARSE_RECORD_FIXED_SEED=1"
    assert digest == recorded[key], f"{key} changed bit for bit"


@pytest.mark.parametrize("name", sorted(PLANS))
def test_generate_videos_are_unchanged(name, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / name
    assert main(["generate", "--plan", PLANS[name], "--out", str(out), *SIZE]) == 0
    for video in ("dense", "sparse"):
        _check(f"generate/{name}/{video}", _digest(iio.imread(out / f"{video}.mp4")))
    report = json.loads((out / "report.json").read_text())
    _check(f"generate/{name}/density", repr(report["executed_attention_density"]))


@pytest.mark.parametrize("budget", [["--max-error", "0.1"], ["--target-speedup", "3"]])
def test_search_from_stats_writes_the_same_plan(budget, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "search"))
    from search_helpers import synthetic_stats

    stats = tmp_path / "tiny.stats.json"
    synthetic_stats().save(stats)
    out = tmp_path / "plan.json"
    assert main(["search", "--model", "tiny-shapes", "--stats", str(stats), "--cost", "flop", "--quiet",
                 "--out", str(out), *budget]) == 0
    plan = json.loads(out.read_text())
    _check(f"search/{'_'.join(budget)}", hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest())
