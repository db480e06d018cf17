import numpy as np
import pytest
import torch

from dit_sparse.zoo import shapes_data as sd
from dit_sparse.zoo.checker import analyze_clip, check_clip, checker_accuracy


def test_checker_on_ground_truth():
    r = checker_accuracy(n=150, seed=1)
    assert r["accuracy"] >= 0.95, r["failures"]


def test_checker_tolerates_blur_and_noise():
    r = checker_accuracy(n=100, seed=2, blur_sigma=1.0, noise_std=0.05)
    assert r["accuracy"] >= 0.9, r["failures"]


def test_checker_rejects_wrong_captions():
    rng = np.random.default_rng(0)
    rejected = total = 0
    for cap, clip in sd.iter_pairs(seed=3, n=40):
        a = sd.parse_caption(cap)
        field = ["colour", "shape", "motion", "background"][total % 4]
        options = {"colour": list(sd.COLOURS), "shape": list(sd.SHAPES), "motion": list(sd.MOTIONS),
                   "background": list(sd.BACKGROUNDS)}[field]
        wrong = rng.choice([o for o in options if o != getattr(a, field)])
        b = sd.Attrs(**{**a.__dict__, field: str(wrong)})
        rejected += not check_clip(clip, b.caption).ok
        total += 1
    assert rejected / total >= 0.95


def test_input_formats_agree():
    a = sd.Attrs("magenta", "triangle", "down", "light")
    clip = sd.render_clip(a, 4)
    u8 = sd.to_uint8(clip)
    f01 = (clip.numpy() + 1) / 2
    chw = torch.from_numpy(f01).permute(0, 3, 1, 2)
    for x in (clip, u8, f01, chw):
        assert check_clip(x, a.caption).ok


def test_blank_clip_fails():
    blank = np.full((8, 32, 32, 3), 20, np.uint8)
    r = check_clip(blank, "a red circle moving left on a dark background")
    assert not r.ok and r.found["colour"] is None


def test_bad_shape_raises():
    with pytest.raises(ValueError):
        analyze_clip(np.zeros((8, 32, 32, 4)))
