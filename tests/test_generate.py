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
