import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from dit_sparse.cli import checkout_module
from dit_sparse.zoo import TinyShapesPipeline
from dit_sparse.zoo.checkpoint import load_checkpoint
from dit_sparse.zoo.model import TinyShapesConfig

tts = checkout_module("tools.train_tiny_shapes", "tools/train_tiny_shapes.py")

TINY = json.dumps({k: v for k, v in asdict(TinyShapesConfig(
    num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, freq_dim=16, text_dim=16,
    text_layers=1, text_heads=2, text_ff=32)).items() if k != "extra"})
BASE = ["--batch-size", "2", "--frames", "2", "--size", "8", "--warmup", "2", "--config", TINY, "--threads", "1"]


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_training_resume_matches_uninterrupted_run_and_exports(tmp_path):
    straight, resumed, export = tmp_path / "a", tmp_path / "b", tmp_path / "export"
    tts.main(["--out", str(straight), "--steps", "3", "--no-export", *BASE])
    tts.main(["--out", str(resumed), "--steps", "3", "--max-minutes", "0", "--no-export", *BASE])
    assert _ckpt(resumed)["step"] == 0  # the time budget stopped it before the first step
    info = tts.main(["--out", str(resumed), "--steps", "3", "--resume", "--export", str(export), *BASE])
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["step"] == b["step"] == 3 and info["steps_done"] == 3
    for part in ("transformer", "text_encoder"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), k
            assert torch.equal(a["ema"][part][k], b["ema"][part][k]), k
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and np.isfinite(log[-1]["loss"])
    pipe = TinyShapesPipeline.from_pretrained(export, local_files_only=True)
    assert pipe.transformer.config.num_layers == 1
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, b["ema"]["transformer"][k].to(v.dtype)), k
    training = json.loads((export / "training.json").read_text())
    assert training["steps_done"] == 3
    # every (re)start is recorded with its exact command, so the README can say how the weights were made
    assert [p["from_step"] for p in training["phases"]] == [0, 0]
    assert "--max-minutes 0" in training["phases"][0]["command"] and "--resume" in training["phases"][1]["command"]


def test_batches_are_pure_functions_of_seed_and_step():
    a = tts.parse_args(["--out", "x", "--batch-size", "3"])
    tok = None
    c1, x1, n1, s1, _ = tts.make_batch(5, a, tok, None)
    c2, x2, n2, s2, _ = tts.make_batch(5, a, tok, None)
    assert c1 == c2 and torch.equal(x1, x2) and torch.equal(n1, n2) and torch.equal(s1, s2)
    c3, *_ = tts.make_batch(6, a, tok, None)
    assert c3 != c1 or not torch.equal(tts.make_batch(6, a, tok, None)[1], x1)


def test_frame_mix_cycles_windows_of_consecutive_frames_cut_from_full_clips():
    from dit_sparse.zoo.shapes_data import sample_batch

    a = tts.parse_args(["--out", "x", "--frame-mix", "8x2,3x4", "--seed", "2"])
    caps, x0, noise, sigma, _ = tts.make_batch(1, a, None, None)  # step 1 -> entry 1: 4 windows of 3 frames
    assert x0.shape == (4, 3, 3, 32, 32) and noise.shape == x0.shape and len(caps) == sigma.shape[0] == 4
    full_caps, full = sample_batch(a.seed * 1_000_003 + 1, 4, 8, 32)
    for clip, whole in zip(x0, full):  # each window is a run of consecutive frames of its clip, same motion
        assert any(torch.equal(clip, whole[:, t:t + 3]) for t in range(6))
    assert tts.make_batch(2, a, None, None)[1].shape == (2, 3, 8, 32, 32)  # the mix cycles
    assert torch.equal(tts.make_batch(1, a, None, None)[1], x0)
    # without a mix the batches are exactly what they were before the option existed
    plain = tts.parse_args(["--out", "x", "--batch-size", "3", "--seed", "2"])
    assert torch.equal(tts.make_batch(4, plain, None, None)[1], sample_batch(2 * 1_000_003 + 4, 3, 8, 32)[1])


@pytest.mark.parametrize("spec", ["8by8", "9x8", "0x4", "4x0", "4x"])
def test_malformed_frame_mix_is_refused_with_the_expected_form(spec, tmp_path):
    with pytest.raises(SystemExit, match="--frame-mix"):
        tts.main(["--out", str(tmp_path), "--frame-mix", spec, "--steps", "1"])


def test_worker_processes_draw_the_same_batches(tmp_path):
    """--workers (for GPU training) changes where batches are drawn, not what they are."""
    plain, pooled = tmp_path / "a", tmp_path / "b"
    tts.main(["--out", str(plain), "--steps", "2", "--no-export", *BASE])
    tts.main(["--out", str(pooled), "--steps", "2", "--no-export", "--workers", "2", *BASE])
    a, b = _ckpt(plain), _ckpt(pooled)
    for k, v in a["transformer"].items():
        assert torch.equal(v, b["transformer"][k]), k


def test_training_noise_levels_follow_the_model_time_shift():
    """The sampler spends its steps at shift * s / (1 + (shift - 1) s); training draws its noise levels the same way."""
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.equal(tts.shift_sigma(s, 1.0), s)
    assert torch.allclose(tts.shift_sigma(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0]))
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # its training grid of sigmas
    assert torch.allclose(sched.sigmas, tts.shift_sigma(torch.arange(1000, 0, -1) / 1000, 3.0), atol=1e-6)
    a = tts.parse_args(["--out", "x", "--batch-size", "64"])
    a.flow_shift = 1.0
    plain = tts.make_batch(0, a, None, None)[3]
    a.flow_shift = 3.0
    shifted = tts.make_batch(0, a, None, None)[3]
    assert torch.allclose(shifted, tts.shift_sigma(plain, 3.0)) and shifted.median() > plain.median() + 0.15


def test_init_from_a_saved_pipeline_starts_from_its_weights(tmp_path):
    first, second, export = tmp_path / "a", tmp_path / "b", tmp_path / "export"
    tts.main(["--out", str(first), "--steps", "2", "--export", str(export), *BASE])
    tts.main(["--out", str(second), "--steps", "1", "--no-export", "--init-from", str(export), "--lr", "0", *BASE])
    saved = TinyShapesPipeline.from_pretrained(export, local_files_only=True).transformer.state_dict()
    for k, v in _ckpt(second)["transformer"].items():  # lr 0: the weights are still the initial ones
        assert torch.equal(v, saved[k]), k
    # how the starting weights were made travels with the new run into its export
    tts.main(["--out", str(second), "--export-only", "--export", str(tmp_path / "export2"), *BASE])
    training = json.loads((tmp_path / "export2" / "training.json").read_text())
    assert training["init_from"]["steps_done"] == 2 and "--init-from" in training["phases"][0]["command"]
    other = json.dumps({**json.loads(TINY), "ffn_dim": 48})
    args = [a if a != TINY else other for a in BASE]
    with pytest.raises(SystemExit, match="does not match"):
        tts.main(["--out", str(tmp_path / "c"), "--steps", "1", "--no-export", "--init-from", str(export), *args])


def test_recorded_command_runs_with_the_same_arguments():
    import shlex

    argv = ["--out", "x", "--mixed-from", "0", "--no-export", "--config", '{"flow_shift": 3.0}', "--lr", "5e-4"]
    recorded = vars(tts.parse_args(argv))
    prefix = len(shlex.split(tts.COMMAND))  # `python tools/train_tiny_shapes.py`
    replayed = vars(tts.parse_args(shlex.split(tts.command_of(recorded))[prefix:] + ["--out", "x"]))
    assert replayed == recorded and replayed["mixed_from"] == 0  # 0 is a value, not an absent option


def test_conditioning_measures_a_running_checkpoint_at_its_training_size(tmp_path):
    from dit_sparse.zoo import conditioning

    tts.main(["--out", str(tmp_path), "--steps", "2", "--stop-at", "1", "--no-export", *BASE])
    pipe, st = load_checkpoint(tmp_path / "checkpoint.pt")
    for k, v in pipe.transformer.state_dict().items():  # the EMA weights, not the raw ones
        assert torch.equal(v, st["ema"]["transformer"][k]), k
    result = conditioning.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--word-choice", "--clips", "1",
                                "--sigmas", "0.95", "--captions", "1", "--threads", "1"])
    assert result["step"] == 1 and result["size"] == 8  # BASE trains on 8x8 clips
    assert all(set(result["word_choice"][n]) == {"0.95"} for n in ("colour", "shape", "motion"))


def test_conditioning_refuses_what_is_not_a_training_checkpoint(tmp_path):
    from dit_sparse.zoo import conditioning

    with pytest.raises(SystemExit, match="no training checkpoint"):
        conditioning.main(["--checkpoint", str(tmp_path / "missing.pt")])
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a train_tiny_shapes checkpoint"):
        conditioning.main(["--checkpoint", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit, match="no training checkpoint"):  # exporting reads checkpoints the same way
        tts.main(["--out", str(tmp_path / "never-trained"), "--export-only", *BASE])
    with pytest.raises(SystemExit) as bad:
        conditioning.main(["--sigmas", "0.9,1.5"])
    assert bad.value.code == 2  # argparse's usage error, before anything loads


def test_resume_accepts_a_checkpoint_from_before_a_config_field_and_refuses_another_config(tmp_path):
    tts.main(["--out", str(tmp_path), "--steps", "1", "--no-export", *BASE])
    st = _ckpt(tmp_path)
    del st["config"]["coordinate_channels"]  # as written before the field existed
    torch.save(st, tmp_path / "checkpoint.pt")
    tts.main(["--out", str(tmp_path), "--steps", "2", "--resume", "--no-export", *BASE])
    assert _ckpt(tmp_path)["step"] == 2
    coords = json.dumps({**json.loads(TINY), "coordinate_channels": True})
    other = [*BASE[:-3], coords, *BASE[-2:]]
    with pytest.raises(SystemExit, match="coordinate_channels"):
        tts.main(["--out", str(tmp_path), "--steps", "3", "--resume", "--no-export", *other])


def test_init_from_a_plain_pipeline_widens_it_with_coordinate_inputs_that_change_nothing(tmp_path):
    plain, widened = tmp_path / "plain", tmp_path / "widened"
    tts.main(["--out", str(tmp_path / "a"), "--steps", "1", "--export", str(plain), *BASE])
    coords = json.dumps({**json.loads(TINY), "coordinate_channels": True})
    args = [a if a != TINY else coords for a in BASE]
    tts.main(["--out", str(widened), "--steps", "1", "--no-export", "--init-from", str(plain), "--lr", "0", *args])
    old = TinyShapesPipeline.from_pretrained(plain, local_files_only=True).transformer
    new = tts.ema_pipeline(_ckpt(widened)["config"], _ckpt(widened)["ema"]).transformer
    assert new.config.in_channels == old.config.in_channels + 3
    x, t, text = torch.randn(2, 3, 2, 8, 8), torch.tensor([100, 900]), torch.randn(2, 16, 16)
    with torch.no_grad():  # zero weights on the new channels: the widened model starts as the plain one
        assert torch.allclose(new(x, t, text, return_dict=False)[0], old(x, t, text, return_dict=False)[0])


def test_object_loss_weights_cover_the_object_and_a_two_pixel_rim_only():
    from dit_sparse.zoo.shapes_data import Attrs, _shape_mask, render_clip, trajectory

    a = Attrs("red", "triangle", "right", "light")
    clip = render_clip(a, seed=3).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)
    w = tts.object_loss_weights(clip, 4.0)[0, 0]
    for t, (cx, cy, r) in enumerate(trajectory(a, np.random.default_rng(3), 8, 32)):
        cover = torch.from_numpy(_shape_mask("triangle", cx, cy, r, 32)) > 0.02
        near = torch.nn.functional.max_pool2d(cover[None].float(), 5, stride=1, padding=2)[0] > 0
        assert torch.all(w[t][cover] == 5.0)  # the object itself
        assert torch.equal(w[t] == 5.0, near)  # and nothing beyond 2 px of it
    assert set(w.unique().tolist()) == {1.0, 5.0}


def test_object_weighted_loss_trains_and_is_recorded(tmp_path):
    info = tts.main(["--out", str(tmp_path / "w"), "--steps", "2", "--object-weight", "3",
                     "--export", str(tmp_path / "e"), *BASE])
    assert info["steps_done"] == 2 and np.isfinite(info["final_loss_avg"])
    training = json.loads((tmp_path / "e" / "training.json").read_text())
    assert training["args"]["object_weight"] == 3.0 and "--object-weight 3 " in training["command"]


def test_half_size_reaches_the_training_batches_and_the_recorded_command():
    from dit_sparse.zoo.shapes_data import sample_batch

    a = tts.parse_args(["--out", "x", "--batch-size", "3", "--seed", "2", "--half-size", "8,9.5"])
    assert a.half_size == (8.0, 9.5)
    x0 = tts.make_batch(4, a, None, None)[1]
    assert torch.equal(x0, sample_batch(2 * 1_000_003 + 4, 3, 8, 32, half_size=(8.0, 9.5))[1])
    assert not torch.equal(x0, sample_batch(2 * 1_000_003 + 4, 3, 8, 32)[1])
    # the recorded command parses back to the same data
    rerun = tts.command_of(vars(a)).removeprefix(tts.COMMAND).split()
    assert tts.parse_args(["--out", "x", *rerun]).half_size == (8.0, 9.5)


@pytest.mark.parametrize("spec", ["9", "a,b", "9,8", "0,5"])
def test_malformed_half_size_is_refused_with_the_expected_form(spec):
    with pytest.raises(SystemExit):
        tts.parse_args(["--out", "x", "--half-size", spec])


def test_half_size_too_large_to_move_in_frame_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--half-size 9.0,10.0.*at most 9.75"):
        tts.main(["--out", str(tmp_path), "--half-size", "9,10", "--steps", "1"])


def test_speed_reaches_the_training_batches_the_shape_contrast_and_the_recorded_command():
    from dit_sparse.zoo.shapes_data import batch_specs, sample_batch, shape_contrast

    a = tts.parse_args(["--out", "x", "--batch-size", "3", "--seed", "2", "--speed", "1", "--shape-weight", "5"])
    assert a.speed == 1.0
    _, x0, _, _, contrast = tts.make_batch(4, a, None, None)
    assert torch.equal(x0, sample_batch(2 * 1_000_003 + 4, 3, 8, 32, speed=1.0)[1])
    assert not torch.equal(x0, sample_batch(2 * 1_000_003 + 4, 3, 8, 32)[1])
    first = batch_specs(2 * 1_000_003 + 4, 3)[0]
    assert torch.equal(contrast[0, 0], shape_contrast(*first, 8, 32, speed=1.0))
    rerun = tts.command_of(vars(a)).removeprefix(tts.COMMAND).split()
    assert tts.parse_args(["--out", "x", *rerun]).speed == 1.0


@pytest.mark.parametrize("speed", ["0", "-1", "fast"])
def test_non_positive_speed_is_refused(speed):
    with pytest.raises(SystemExit):
        tts.parse_args(["--out", "x", "--speed", speed])


def test_half_size_limit_follows_the_speed(tmp_path):
    with pytest.raises(SystemExit, match="moving 1.0 px per frame.*at most 11.50"):
        tts.main(["--out", str(tmp_path), "--half-size", "11,12", "--speed", "1", "--steps", "1"])


def test_shape_weight_lines_up_with_the_clip_and_adds_to_the_object_weight():
    from dit_sparse.zoo.shapes_data import batch_specs, shape_contrast

    a = tts.parse_args(["--out", "x", "--batch-size", "3", "--seed", "2", "--half-size", "7.5,9.5",
                        "--object-weight", "4", "--shape-weight", "8", "--frame-mix", "8x3,4x3"])
    caps, x0, _, _, contrast = tts.make_batch(0, a, None, None)
    assert contrast.shape == (3, 1, 8, 32, 32)
    specs = batch_specs(2 * 1_000_003, 3)
    assert all(c in (s.caption, "") for c, (s, _) in zip(caps, specs))  # "" where the caption was dropped
    for clip, c, (attrs, seed) in zip(x0, contrast, specs):
        assert torch.equal(c[0], shape_contrast(attrs, seed, 8, 32, (7.5, 9.5)))
        on_object = (clip - clip[:, :1, :1, :1]).abs().amax(dim=0) > 0.05
        assert c[0][~on_object].max() <= 1.0 and (c[0] > 0.5).sum() > 8 * 10  # corners/tips are marked ...
        far = torch.nn.functional.max_pool3d(on_object[None].float(), (1, 15, 15), 1, (0, 7, 7))[0] == 0
        assert c[0][far].max() == 0  # ... and nothing far from the object
    w = tts.loss_weights(x0, contrast, a)
    assert torch.allclose(w, tts.object_loss_weights(x0, 4.0) + 8 * contrast)
    window = tts.make_batch(1, a, None, None)  # the 4-frame windows cut the maps like the clips
    assert window[4].shape == window[1][:, :1].shape == (3, 1, 4, 32, 32)
    plain = tts.parse_args(["--out", "x"])
    assert tts.make_batch(0, plain, None, None)[4] is None and tts.loss_weights(x0, None, plain) is None


def test_shape_weighted_loss_trains_and_is_recorded(tmp_path):
    info = tts.main(["--out", str(tmp_path / "w"), "--steps", "2", "--shape-weight", "8",
                     "--export", str(tmp_path / "e"), *BASE])
    assert info["steps_done"] == 2 and np.isfinite(info["final_loss_avg"])
    training = json.loads((tmp_path / "e" / "training.json").read_text())
    assert training["args"]["shape_weight"] == 8.0 and "--shape-weight 8" in training["command"]
