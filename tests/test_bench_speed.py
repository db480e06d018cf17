"""`dit-sparse bench speed`: a real architecture's config (one layer) with random weights, from the CLI."""

import json

import pytest

from dit_sparse.cli import main

# Wan 2.1 1.3B, one block, 9 frames of 128x128 -> 3 x 8 x 8 = 192 video tokens (patch 1x2x2 on the 1/8 latent)
SMALL = ["--arch", "wan2.1-1.3b", "--layers", "1", "--frames", "9", "--height", "128", "--width", "128",
         "--repeats", "1"]


def test_bench_speed_writes_dense_and_one_record_per_plan(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["bench", "speed", *SMALL, "--plans", "diagonal:window=[0,1,1]", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["architecture"] == "wan2.1-1.3b" and result["layers"] == 1
    assert result["size"] == {"frames": 9, "height": 128, "width": 128, "video_tokens": 192}
    dense, sparse = result["results"]
    assert dense["plan"] == "dense" and dense["speedup"] == 1.0 and dense["executed_density"] == 1.0
    assert sparse["plan"] == "diagonal:window=[0,1,1]" and sparse["seconds"] > 0
    assert sparse["speedup"] == pytest.approx(dense["seconds"] / sparse["seconds"])
    assert sparse["executed_density"] == pytest.approx(1 / 3, abs=0.05)  # frame-local over 3 latent frames
    assert "fidelity is not measured" in capsys.readouterr().out


def test_bench_speed_bad_input_ends_with_one_clear_line(tmp_path, capsys):
    assert main(["bench", "speed", "--arch", "wan9", "--out", str(tmp_path)]) == 2
    assert "--arch must be one of wan2.1-1.3b, cogvideox-5b, hunyuanvideo" in capsys.readouterr().err
    assert main(["bench", "speed", *SMALL, "--plans", "block_adaptive", "--out", str(tmp_path)]) == 2
    assert "weight-dependent density" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
