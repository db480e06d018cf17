"""A plan under diffusers' context parallelism gives the single-process output: Ulysses, ring and both, 2 and 4
processes (torchrun, gloo on CPU), batch 2, CFG, every strategy family, three ways of applying it (worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")
TOLERANCE = 1e-5

# (family, processes, ulysses_degree, ring_degree). Wan: video-only self-attention; Flux: joint attention, text first,
# text split too; LTX-Video: video-only, its cross-attention (to a split, padded text) run on the whole text;
# CogVideoX: joint, text first, and HunyuanVideo: joint, text last and padded (left whole on every rank), with the
# cp_plans dit-sparse supplies.
SETUPS = [
    ("wan", 2, 2, 1), ("wan", 2, 1, 2), ("wan", 4, 4, 1), ("wan", 4, 1, 4), ("wan", 4, 2, 2),
    ("flux", 2, 2, 1), ("flux", 2, 1, 2), ("flux", 4, 4, 1), ("flux", 4, 2, 2),
    ("ltx_video", 2, 2, 1), ("ltx_video", 2, 1, 2), ("ltx_video", 4, 2, 2),
    ("cogvideox", 2, 1, 2), ("cogvideox", 4, 2, 2),
    ("hunyuan_video", 2, 2, 1), ("hunyuan_video", 4, 2, 2),
]
# diffusers' ulysses_anything / ring_anything: token counts the degree does not divide (245 video tokens, 7 text).
UNEVEN = [("wan", 2, 2, 1), ("wan", 4, 1, 4), ("flux", 4, 1, 4), ("ltx_video", 2, 1, 2), ("cogvideox", 2, 1, 2),
          ("hunyuan_video", 4, 4, 1)]


def run_worker(tmp_path, family, procs, ulysses, ring, *extra):
    """Start worker.py under torchrun; its results (rank 0's) and the finished process."""
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(WORKER), "--family", family, "--ulysses", str(ulysses), "--ring", str(ring), "--out", str(out),
               *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"the workers wrote no result (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text()), done


@pytest.mark.parametrize("family, procs, ulysses, ring, uneven",
                         [pytest.param(*setup, False, id="{}-{}procs-ulysses{}-ring{}".format(*setup))
                          for setup in SETUPS]
                         + [pytest.param(*setup, True, id="{}-{}procs-ulysses{}-ring{}-uneven".format(*setup))
                            for setup in UNEVEN])
def test_a_plan_under_context_parallelism_gives_the_single_process_output(tmp_path, family, procs, ulysses, ring,
                                                                          uneven):
    results, done = run_worker(tmp_path, family, procs, ulysses, ring, *(["--uneven"] if uneven else []))
    diffs = {case: value for case, value in results.items()
             if not case.endswith(("traffic", "head orders", "density")) and case != "refusals"}
    assert len(diffs) >= 10, f"expected every plan and every order to run: {sorted(diffs)}"
    failures = {case: value for case, value in diffs.items()
                if not isinstance(value, float) or value > TOLERANCE}
    assert not failures, "\n\n".join(f"{case}: {value}" for case, value in failures.items())
    assert done.returncode == 0, done.stderr[-4000:]
    densities = {case: value for case, value in results.items() if case.endswith("density")}
    assert len(densities) == len(diffs)
    for case, (one_process, summed) in densities.items():
        assert summed == pytest.approx(one_process, rel=1e-9), f"{case}: executed density {summed} vs {one_process}"
    mixed_orders = next(value for case, value in results.items() if case.startswith("mixed") and "orders" in case)
    if 1 < ulysses < 4:  # dense, diagonal, stripe, skip over 2 ranks: the dense head's rank would do the most
        assert "None" not in mixed_orders, mixed_orders
    if family == "wan" and not uneven:
        refusals = results["refusals"]
        assert "divisible by mesh size" in refusals["ragged"], refusals  # diffusers' own even split
        if ulysses > 1:
            assert refusals["heads"].startswith("UnsupportedParallelismError") and "ulysses_degree" in \
                refusals["heads"] and "processors changed" not in refusals["heads"], refusals


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_a_ring_sends_only_the_shards_a_layout_visits(tmp_path, family):
    """One frame either side over 8 frames on 4 ranks: each rank needs its neighbours' shards, not all three others;
    dense heads and dense steps need every shard. With text (CogVideoX split, HunyuanVideo whole and padded), text
    rows, which see every key, merge every rank's partial result instead."""
    results, _ = run_worker(tmp_path, family, 4, 1, 4, "--plans", "frame_local", "dense")
    local = results["frame_local (apply, then enable) traffic"]
    dense = results["dense (enable, then apply) traffic"]
    assert dense["sent"] == dense["dense"] > 0
    assert 0 < local["sent"] < local["dense"], local
    assert results["frame_local (apply, then enable)"] <= TOLERANCE
