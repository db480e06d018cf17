import itertools
import random

import numpy as np
import pytest
import torch

from dit_sparse.zoo import shapes_data as sd


def test_render_is_deterministic_in_seed():
    a = sd.Attrs("red", "triangle", "left", "dark")
    x1, x2 = sd.render_clip(a, 7), sd.render_clip(a, 7)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, sd.render_clip(a, 8))
    assert x1.shape == (8, 32, 32, 3) and x1.dtype == torch.float32
    assert float(x1.min()) >= -1 and float(x1.max()) <= 1


def test_batches_and_pairs_are_reproducible():
    c1, x1 = sd.sample_batch(3, 4)
    c2, x2 = sd.sample_batch(3, 4)
    assert c1 == c2 and torch.equal(x1, x2)
    assert x1.shape == (4, 3, 8, 32, 32)
    p1 = [(c, x) for c, x in sd.iter_pairs(seed=5, n=3)]
    p2 = [(c, x) for c, x in sd.iter_pairs(seed=5, n=3)]
    assert [c for c, _ in p1] == [c for c, _ in p2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(p1, p2))


def test_other_sizes_render():
    a = sd.Attrs("blue", "square", "growing", "light")
    x = sd.render_clip(a, 0, num_frames=4, size=16)
    assert x.shape == (4, 16, 16, 3)


@pytest.mark.parametrize("motion", sd.MOTIONS)
def test_motion_is_visible(motion):
    a = sd.Attrs("yellow", "circle", motion, "dark")
    clip = sd.render_clip(a, 11)
    fg = (clip - clip[0, 0, 0]).abs().sum(-1) > 0.5  # (T, H, W)
    area = fg.sum((1, 2)).float()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx = (fg * xs).sum((1, 2)) / area
    cy = (fg * ys).sum((1, 2)) / area
    dx, dy, ratio = float(cx[-1] - cx[0]), float(cy[-1] - cy[0]), float(area[-1] / area[0])
    expect = {"left": dx < -8, "right": dx > 8, "up": dy < -8, "down": dy > 8,
              "still": abs(dx) < 0.5 and abs(dy) < 0.5 and abs(ratio - 1) < 0.01,
              "growing": ratio > 3, "shrinking": ratio < 1 / 3}
    assert expect[motion], (dx, dy, ratio)


def test_captions_parse_back():
    for a in sd.all_combos():
        assert sd.parse_caption(a.caption) == a
    with pytest.raises(ValueError):
        sd.parse_caption("a purple circle moving left on a dark background")
    with pytest.raises(ValueError):
        sd.parse_caption("hello")


def test_heldout_split():
    held = sd.heldout_prompts()
    assert len(held) == 50 == len(set(held))
    train = {a.caption for a in sd.TRAIN_COMBOS}
    assert not set(held) & train
    assert len(train) + len(held) == len(sd.all_combos())
    # the sampler used for training never yields a held-out combination
    rng = random.Random(0)
    assert all(sd.sample_attrs(rng).caption not in held for _ in range(2000))
    # every pair of attribute values is still seen in training, so held-out prompts are compositions
    fields = ("colour", "shape", "motion", "background")
    for f1, f2 in itertools.combinations(fields, 2):
        seen = {(getattr(a, f1), getattr(a, f2)) for a in sd.TRAIN_COMBOS}
        every = {(getattr(a, f1), getattr(a, f2)) for a in sd.all_combos()}
        assert seen == every, (f1, f2)


def test_to_uint8():
    x = sd.render_clip(sd.Attrs("green", "circle", "still", "light"), 0)
    u = sd.to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (8, 32, 32, 3)


@pytest.mark.parametrize("motion", ["left", "down", "still"])
def test_half_size_sets_the_size_of_moving_and_still_shapes_and_keeps_them_in_frame(motion):
    a = sd.Attrs("red", "square", motion, "dark")
    largest = sd.max_half_size()
    for seed in range(20):
        track = sd.trajectory(a, np.random.default_rng(seed), 8, 32, half_size=(largest, largest))
        assert all(r == largest for _, _, r in track)
        assert all(r + 1.0 - 1e-6 <= c <= 32 - r - 1.0 + 1e-6 for cx, cy, r in track for c in (cx, cy)), track
    # growing and shrinking shapes keep their own sizes; the default range is the shipped data's
    grow = sd.trajectory(sd.Attrs("red", "square", "growing", "dark"), np.random.default_rng(0), 8, 32, (9, 9))
    assert grow[0][2] == 3.5 and grow[-1][2] == 9.5
    assert torch.equal(sd.render_clip(a, 3), sd.render_clip(a, 3, half_size=sd.HALF_SIZE))
    assert not torch.equal(sd.render_clip(a, 3), sd.render_clip(a, 3, half_size=(9.0, 9.5)))


@pytest.mark.parametrize("motion,axis,sign", [("left", 0, -1), ("up", 1, -1), ("right", 0, 1)])
def test_speed_sets_the_step_per_frame_and_slower_shapes_may_be_larger(motion, axis, sign):
    a = sd.Attrs("blue", "triangle", motion, "light")
    for speed in (0.75, 1.0, sd.SPEED, 2.0):
        largest = sd.max_half_size(8, speed)
        for seed in range(10):
            track = sd.trajectory(a, np.random.default_rng(seed), 8, 32, (largest, largest), speed)
            steps = np.diff([p[axis] for p in track])
            assert np.allclose(steps, sign * speed)
            assert all(r + 1.0 - 1e-6 <= c <= 32 - r - 1.0 + 1e-6 for cx, cy, r in track for c in (cx, cy)), track
    assert sd.max_half_size(8, 1.0) > sd.max_half_size(8) == sd.max_half_size(8, sd.SPEED)
    half = sd.trajectory(a, np.random.default_rng(0), 8, 16, speed=1.0)  # speeds scale with the frame size
    assert np.allclose(np.diff([p[axis] for p in half]), sign * 0.5)
    assert torch.equal(sd.render_clip(a, 3), sd.render_clip(a, 3, speed=sd.SPEED))
    assert not torch.equal(sd.render_clip(a, 3), sd.render_clip(a, 3, speed=1.0))


@pytest.mark.parametrize("shape", sd.SHAPES)
def test_shape_areas_and_centroids_match_the_rendered_masks(shape):
    m = sd._shape_mask(shape, 16.0, 15.0, 8.0, 32)
    assert m.sum() == pytest.approx(sd.SHAPE_AREA[shape] * 64, rel=0.03)
    centroid_y = (m.sum(axis=1) * (np.arange(32) + 0.5)).sum() / m.sum()
    assert centroid_y == pytest.approx(15.0 + sd.CENTROID_DROP[shape] * 8, abs=0.1)


def test_shape_contrast_marks_where_the_shapes_differ_and_follows_the_clip():
    square, circle = (sd.Attrs("red", s, "right", "dark") for s in ("square", "circle"))
    c = sd.shape_contrast(square, 5)
    assert c.shape == (8, 32, 32) and 0 <= c.min() and c.max() <= 1
    (cx, cy, r), *_ = sd.trajectory(square, np.random.default_rng(5), 8, 32)
    h = 0.9 * r  # a square's corner lies outside the circle of equal area; its centre is inside every shape
    assert c[0, int(cy - h + 0.5), int(cx - h + 0.5)] > 0.5 and c[0, int(cy), int(cx)] == 0
    assert not torch.equal(c[0], c[-1])  # it moves with the shape
    assert not torch.equal(sd.shape_contrast(circle, 5), c)
