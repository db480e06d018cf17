"""`dit-sparse generate` on a locally saved tiny-shapes pipeline at a reduced size, and its bad-input errors; the
labelled side-by-side clip."""

import json

import numpy as np
import pytest

from dit_sparse.cli import main
from dit_sparse.plan import ModelFingerprint, SparsePlan
from dit_sparse.video import SHOWN_HEIGHT, side_by_side


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
    import imageio.v3 as iio

    dense, side = iio.imread(out / "dense.mp4"), iio.imread(out / "side_by_side.mp4")
    assert dense.shape == (2, 256, 256, 3)  # 16x16 upscaled to 256
    band = side.shape[1] - 256  # the caption band above the pictures
    assert side.shape == (2, 256 + band, 512, 3) and 0 < band < 128 and side.shape[1] % 2 == 0
    assert np.abs(side[:, band:, :256].astype(int) - dense).mean() < 8  # the left half is the dense clip
    caption = side[:, :band].astype(int)
    assert caption.max() - caption.min() > 150  # text on the band, not a uniform strip
    labelled = side_by_side(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))[0, :band].astype(int)
    swapped = side_by_side(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)), ("sparse", "dense"))[0, :band]
    assert np.abs(caption - labelled).mean() < np.abs(caption - swapped.astype(int)).mean() / 2  # dense | sparse


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


def _no_model_load(monkeypatch):
    import dit_sparse.generate as generate

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the bad input was found")

    monkeypatch.setattr(generate, "load_model", refuse)


@pytest.mark.parametrize("name", ["./mymodel", "../mymodel", "~/no-such-dit-sparse-model", "models/x/y", "NOPE"])
def test_mistyped_local_model_folder_is_one_line_before_loading(tmp_path, capsys, monkeypatch, name):
    """A path-like --model that does not exist is a mistyped folder, not a hub id (the hub's HFValidationError
    about repository ids was a traceback)."""
    name = str(tmp_path / "nope") + "/x/y" if name == "NOPE" else name
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    assert main(["generate", "--model", name, *SMALL, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model: no such model folder {name} (and it is not a hub id: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", "mymodel", *SMALL, "--out", str(tmp_path / "out")]) == 2
    assert "neither a local directory nor a hub id" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--height", "100000"], "--height 100000 is not a plausible size (at most 16,384 pixels)"),
    (["--width", "-4"], "--width must be positive, got -4"),
    (["--frames", "1000000"], "--frames 1000000 is not a plausible size"),
])
def test_absurd_sizes_are_refused_before_the_model_loads(saved_pipeline, tmp_path, capsys, monkeypatch, extra,
                                                         message):
    _no_model_load(monkeypatch)
    assert main(["generate", "--model", saved_pipeline, *SMALL, *extra, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_too_many_tokens_for_the_cpu_is_refused_before_generating_unless_forced(saved_pipeline, tmp_path, capsys,
                                                                                 monkeypatch):
    """--height 512 --width 512 on tiny-shapes ran silently for minutes: now the token count and the estimates
    are named before any generation, and --force runs it."""
    import dit_sparse.comparison as comparison
    import dit_sparse.workload as workload

    def no_generation(*args, **kwargs):
        raise comparison.ArgumentError("generation reached")

    monkeypatch.setattr(comparison, "warm_up", no_generation)
    args = ["generate", "--model", saved_pipeline, *SMALL, "--height", "512", "--width", "512",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 frames of 512x512 px is 131,072 video tokens (grid 2x256x256)" in err
    assert "more than 65,536 video tokens on CPU" in err and "GiB per layer" in err and "--force" in err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: 2 frames of 512x512 px")
    assert main(args + ["--force"]) == 2
    assert "generation reached" in capsys.readouterr().err
    monkeypatch.setattr(workload, "available_memory", lambda device: 1024)  # the scores (512 KiB) do not fit
    assert main(["generate", "--model", saved_pipeline, *SMALL, "--out", str(tmp_path / "out")]) == 2
    assert "512.0 KiB per layer" in (err := capsys.readouterr().err) and "more than the 1.0 KiB of free memory" in err


def test_force_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--force" in capsys.readouterr().out


def test_tiny_frames_give_ssim_null_with_a_reason(saved_pipeline, tmp_path, capsys):
    """--height 2 --width 2 ran both generations and then died in SSIM (ZeroDivisionError)."""
    out = tmp_path / "gen"
    args = ["generate", "--model", saved_pipeline, "--plan", "diagonal", "--steps", "2", "--frames", "2",
            "--height", "2", "--width", "2", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ssim"] is None and report["ssim_note"].startswith("frames too small for SSIM (2x2")
    assert "n/a (frames too small for SSIM" in capsys.readouterr().out


def _strict_json(path):
    def refuse(constant):
        pytest.fail(f"{path} holds {constant}, which strict JSON parsers reject")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_exact_psnr_is_null_with_a_reason_not_infinity(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", saved_pipeline, "--plan", "dense", *SMALL, "--repeats", "1",
                 "--out", str(out)]) == 0
    report = _strict_json(out / "report.json")
    assert report["psnr"] is None and report["psnr_note"].startswith("exact")
    assert "exact (the videos are identical)" in capsys.readouterr().out


def test_out_folder_is_checked_for_writing_before_the_model_loads(saved_pipeline, tmp_path, capsys, monkeypatch):
    import errno

    import dit_sparse.atomic as atomic

    _no_model_load(monkeypatch)
    (tmp_path / "a-file").write_text("")
    assert main(["generate", "--model", saved_pipeline, *SMALL, "--out", str(tmp_path / "a-file" / "sub")]) == 2
    assert f"could not write to --out {tmp_path / 'a-file' / 'sub'}: not a directory" in capsys.readouterr().err

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic, "_probe", read_only)
    assert main(["generate", "--model", saved_pipeline, *SMALL, "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert f"could not write to --out {tmp_path / 'ro'}: read-only file system" in err and err.count("\n") == 1


@pytest.mark.parametrize("failing", ["sparse.mp4", "report.json", "side_by_side.mp4"])
def test_a_late_write_failure_is_one_line_and_keeps_what_was_written(saved_pipeline, tmp_path, capsys, monkeypatch,
                                                                     failing):
    """Each file is written as soon as it exists (dense.mp4 after the dense run, ...); a full disk late names the
    file and keeps the earlier ones (before: a traceback, the results lost, a 0-byte side_by_side.mp4)."""
    import errno
    from pathlib import Path

    import imageio.v2 as imageio

    def full_disk(path):
        if failing in Path(path).name or Path(path).name.startswith(f".{Path(failing).stem}."):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_mimwrite, real_write_text = imageio.mimwrite, Path.write_text

    def mimwrite(path, *args, **kwargs):
        full_disk(path)
        return real_mimwrite(path, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        full_disk(self)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(imageio, "mimwrite", mimwrite)
    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "gen"
    assert main(["generate", "--model", saved_pipeline, "--plan", "diagonal", *SMALL, "--repeats", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\nerror: could not write {out / failing}: no space left on device\n")
    assert "Traceback" not in err and err.count("error:") == 1
    order = ["dense.mp4", "sparse.mp4", "report.json", "side_by_side.mp4"]
    kept = order[:order.index(failing)]
    assert sorted(p.name for p in out.iterdir()) == sorted(kept)  # no 0-byte file, no temporary file
    assert all((out / name).stat().st_size > 0 for name in kept)


def test_the_dense_video_is_written_before_the_sparse_run(saved_pipeline, tmp_path, monkeypatch):
    import dit_sparse.comparison as comparison

    out = tmp_path / "gen"
    real = comparison.timed_generation
    calls = []

    def timing(*args):
        calls.append(1)
        if len(calls) == 2:  # the sparse run fails (out of memory, interrupted...)
            assert (out / "dense.mp4").stat().st_size > 0
            raise comparison.ArgumentError("the sparse run failed")
        return real(*args)

    monkeypatch.setattr(comparison, "timed_generation", timing)
    assert main(["generate", "--model", saved_pipeline, "--plan", "diagonal", *SMALL, "--repeats", "1",
                 "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["dense.mp4"]


def test_repeated_timings_keep_the_fastest_and_the_same_frames(monkeypatch):
    """Each way is timed `repeats` times, interleaved with the other; the report keeps the fastest of each, and the
    frames of every repeat are the same (no cache carries over from one sparse generation to the next)."""
    import numpy as np

    import dit_sparse.comparison as comparison
    from dit_sparse.zoo import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.uniform(pipe.transformer, "diagonal", window=[0, 1, 1], rescale=True).with_schedule(
        dense_first=0.25, refresh_interval=5)
    seconds = iter([5.0, 4.0, 3.0, 6.0])  # dense, sparse, dense, sparse
    runs = []
    real = comparison.timed_generation

    def fake_timing(*args):
        frames, _, _, _ = real(*args)
        runs.append(frames)
        value = next(seconds)
        return frames, value, value / 2, value / 4

    monkeypatch.setattr(comparison, "timed_generation", fake_timing)
    kwargs = {"prompt": "a red circle moving right on a dark background", "num_inference_steps": 4,
              "num_frames": 4, "height": 32, "width": 32, "output_type": "np"}  # 1024 tokens: 4 query blocks
    result = comparison.compare_dense_sparse(pipe, plan, kwargs, seed=0, repeats=2)
    m = result.metrics
    assert (m["dense_seconds"], m["sparse_seconds"], m["repeats"]) == (3.0, 4.0, 2)
    assert m["speedup"] == pytest.approx(0.75) and m["sparse_attention_seconds"] == 2.0
    assert m["sparse_kernel_seconds"] == 1.0
    assert np.array_equal(runs[0], runs[2]) and np.array_equal(runs[1], runs[3])
    assert not np.array_equal(runs[0], runs[1]) and 0 < m["executed_attention_density"] < 1



@pytest.fixture(params=["freetype", "bitmap"])
def label_font(request, monkeypatch):
    """Both fonts side_by_side draws with: Pillow's FreeType default at a size, and the bitmap font that stands in
    where FreeType (or load_default(size=...), Pillow < 10.1) is missing."""
    if request.param == "bitmap":
        from PIL import ImageFont

        bitmap = ImageFont.load_default_imagefont

        def no_freetype(size=None):
            if size is not None:
                raise ImportError("The _imagingft C module is not installed")
            return bitmap()

        monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    return request.param


def _clips(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (3, 32, 32, 3), (1, 15, 15, 3), (1, 8, 12, 3), (1, 300, 40, 3)])
def test_side_by_side_puts_a_caption_band_above_both_pictures_intact(label_font, shape):
    dense, sparse = _clips(shape)
    out = side_by_side(dense, sparse)
    frames, height, width, _ = shape
    scale = out.shape[2] // 2 // width
    band = out.shape[1] - height * scale
    assert out.dtype == np.uint8 and out.shape == (frames, height * scale + band, 2 * width * scale, 3)
    assert out.shape[1] % 2 == 0 and out.shape[2] % 2 == 0  # libx264, yuv420p
    assert scale == max(1, SHOWN_HEIGHT // height, -(-96 // width))  # as tall as write_video shows it, >= 96 wide
    assert max(1, SHOWN_HEIGHT // out.shape[1]) == 1  # write_video then keeps it at its size
    assert 10 <= band < height * scale
    for half, clip in zip((out[:, band:, :width * scale], out[:, band:, width * scale:]), (dense, sparse)):
        assert np.array_equal(half, clip.repeat(scale, axis=1).repeat(scale, axis=2))  # nearest, pixel for pixel
    caption = out[:, :band]
    assert (caption == caption[:1]).all() and (caption == caption[..., :1]).all()  # one grey band on every frame
    assert caption[0, 0, 0, 0] == 0 and caption.max() == 255  # white text on black
    floats = side_by_side(dense / 255.0, sparse / 255.0)
    assert np.array_equal(floats, out)  # float clips in [0, 1] as written by write_video


def test_side_by_side_bands_name_their_own_half(label_font):
    """The left band is the rendering of "dense" and the right one of "sparse", whatever the pictures: a swapped or
    missing label fails."""
    dense, sparse = _clips((1, 16, 16, 3))
    out = side_by_side(dense, sparse)
    band = out.shape[1] - 256
    left, right = out[0, :band, :256], out[0, :band, 256:]
    other_dense, other_sparse = _clips((1, 16, 16, 3), seed=1)
    as_dense = side_by_side(other_dense, other_sparse, labels=("dense", "dense"))[0, :band]
    as_sparse = side_by_side(other_dense, other_sparse, labels=("sparse", "sparse"))[0, :band]
    assert np.array_equal(as_dense[:, :256], as_dense[:, 256:])  # a band depends on its label only
    assert np.array_equal(as_sparse[:, :256], as_sparse[:, 256:])
    assert np.array_equal(left, as_dense[:, :256]) and np.array_equal(right, as_sparse[:, :256])
    assert not np.array_equal(left, right)
    assert left.max() == 255 and right.max() == 255  # neither band is blank
    assert not np.array_equal(side_by_side(dense, sparse, labels=("A", "B")), out)


def test_side_by_side_refuses_clips_of_different_shapes():
    with pytest.raises(ValueError, match="of one shape"):
        side_by_side(np.zeros((2, 16, 16, 3)), np.zeros((2, 16, 32, 3)))
