"""`dit-sparse generate` on a locally saved tiny-shapes pipeline at a reduced size, and its bad-input errors."""

import json

import pytest

from dit_sparse.cli import main
from dit_sparse.plan import ModelFingerprint, SparsePlan


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from dit_sparse.zoo import build_pipeline

    path = tmp_path_factory.mktemp("tiny-shapes-local")
    build_pipeline().save_pretrained(path)
    return str(path)


SMALL = ["--steps", "2", "--frames", "2", "--height", "16", "--width", "16"]


def test_generate_smoke_writes_videos_and_report(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", saved_pipeline, "--plan", "diagonal", "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_seconds", "sparse_seconds", "speedup", "psnr", "ssim", "dense_caption_ok", "sparse_caption_ok"):
        assert key in report
    assert report["dense_seconds"] > 0 and report["sparse_seconds"] > 0
    assert report["repeats"] == 2  # the default: the fastest of two interleaved timings each way
    assert isinstance(report["dense_caption_ok"], bool)
    assert 0 < report["executed_attention_density"] <= 1
    for name in ("dense.mp4", "sparse.mp4", "side_by_side.mp4"):
        assert (out / name).stat().st_size > 0
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--plan", "wiggle"], "neither a plan file nor a strategy"),
        (["--steps", "0"], "--steps must be a positive"),
        (["--height", "15"], "refused these settings"),
        (["--dtype", "float8"], "--dtype must be one of"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--guidance", "nan"], "--guidance must be a number >= 0"),
        (["--device", "gpu"], "'gpu' is not a torch device"),
        (["--plan", "."], "is a directory, not a plan file"),
        (["--executor", "triton"], "needs a CUDA GPU (--device cuda)"),
        (["--executor", "fast"], "unknown executor 'fast'"),
        (["--out", __file__], "is an existing file; --out takes a folder"),
    ],
)
def test_bad_arguments_are_clear_errors(saved_pipeline, tmp_path, capsys, extra, message):
    args = ["generate", "--model", saved_pipeline, "--out", str(tmp_path / "x"), *SMALL, *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_plan_for_another_model_is_refused(saved_pipeline, tmp_path, capsys):
    other = SparsePlan(ModelFingerprint("WanTransformer3DModel", 30, 12, 128))
    path = other.save(tmp_path / "wan.plan.json")
    assert main(["generate", "--model", saved_pipeline, "--plan", str(path), *SMALL, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "num_layers: plan has 30, model has 4" in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope") + "/x/y", *SMALL]) == 2
    assert "neither a local directory nor a hub id" in capsys.readouterr().err


def test_repeated_timings_keep_the_fastest_and_the_same_frames(monkeypatch):
    """Each way is timed `repeats` times, interleaved with the other; the report keeps the fastest of each, and the
    frames of every repeat are the same (no cache carries over from one sparse generation to the next)."""
    import numpy as np

    import dit_sparse.generate as generate
    from dit_sparse.zoo import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.uniform(pipe.transformer, "diagonal", window=[0, 1, 1], rescale=True).with_schedule(
        dense_first=0.25, refresh_interval=5)
    seconds = iter([5.0, 4.0, 3.0, 6.0])  # dense, sparse, dense, sparse
    runs = []
    real = generate.timed_generation

    def fake_timing(*args):
        frames, _, _ = real(*args)
        runs.append(frames)
        value = next(seconds)
        return frames, value, value / 2

    monkeypatch.setattr(generate, "timed_generation", fake_timing)
    kwargs = {"prompt": "a red circle moving right on a dark background", "num_inference_steps": 4,
              "num_frames": 4, "height": 32, "width": 32, "output_type": "np"}  # 1024 tokens: 4 query blocks
    result = generate.compare_dense_sparse(pipe, plan, kwargs, seed=0, repeats=2)
    m = result.metrics
    assert (m["dense_seconds"], m["sparse_seconds"], m["repeats"]) == (3.0, 4.0, 2)
    assert m["speedup"] == pytest.approx(0.75) and m["sparse_attention_seconds"] == 2.0
    assert np.array_equal(runs[0], runs[2]) and np.array_equal(runs[1], runs[3])
    assert not np.array_equal(runs[0], runs[1]) and 0 < m["executed_attention_density"] < 1

