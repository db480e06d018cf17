"""Procedural "tiny-shapes" clips: one coloured shape moving on a plain background, with a caption.

Everything is computed from a seed; no files are read. A clip is a float tensor ``(T, H, W, 3)`` in ``[-1, 1]``
(``T=8, H=W=32`` by default). The caption grammar is::

    a {colour} {shape} {motion phrase} on a {background} background

with the motion phrases ``moving left|right|up|down``, ``staying still``, ``growing`` and ``shrinking``.

Held-out split: :data:`HELDOUT_COMBOS` are 50 *attribute combinations* (colour, shape, motion, background) out of
the 210 possible ones; :func:`sample_attrs` (used for training) never produces them, so the 50 held-out prompts are
captions the model has never seen during training. Every pair of attribute values is still seen in training
(checked in the tests), so the model can compose them.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
# RGB in 0..255; chosen to be far apart from each other and from both backgrounds.
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 245),
    "yellow": (245, 225, 20),
    "magenta": (225, 40, 225),
}
MOTIONS = ("left", "right", "up", "down", "still", "growing", "shrinking")
BACKGROUNDS = {
    "dark": (20, 20, 24),
    "light": (215, 215, 210),
}
MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "staying still",
    "growing": "growing",
    "shrinking": "shrinking",
}

DEFAULT_FRAMES = 8
DEFAULT_SIZE = 32
SPEED = 1.5  # pixels per frame at 32x32 (scaled with the frame size)
SUPERSAMPLE = 4
# half-size range (pixels at 32x32) of moving and still shapes; growing / shrinking ones span 3.5-9.5
HALF_SIZE = (5.5, 7.5)
NUM_HELDOUT = 50
HELDOUT_SEED = 1234


@dataclass(frozen=True)
class Attrs:
    colour: str
    shape: str
    motion: str
    background: str

    @property
    def caption(self) -> str:
        return caption_for(self)


def caption_for(a: Attrs) -> str:
    return f"a {a.colour} {a.shape} {MOTION_PHRASES[a.motion]} on a {a.background} background"


def parse_caption(caption: str) -> Attrs:
    """Inverse of :func:`caption_for`; raises ``ValueError`` on a caption outside the grammar."""
    words = caption.strip().lower().split()
    try:
        colour, shape = words[1], words[2]
        rest = " ".join(words[3:])
        motion = next(m for m, p in MOTION_PHRASES.items() if rest.startswith(p + " "))
        background = words[-2]
    except (IndexError, StopIteration):
        raise ValueError(f"caption not in the tiny-shapes grammar: {caption!r}") from None
    if colour not in COLOURS or shape not in SHAPES or background not in BACKGROUNDS or words[-1] != "background":
        raise ValueError(f"caption not in the tiny-shapes grammar: {caption!r}")
    return Attrs(colour, shape, motion, background)


def vocabulary() -> list[str]:
    """All words of the grammar, in a fixed order."""
    words: list[str] = []
    for a in all_combos():
        for w in a.caption.split():
            if w not in words:
                words.append(w)
    return words


def all_combos() -> list[Attrs]:
    return [Attrs(c, s, m, b) for c, s, m, b in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS)]


def _heldout() -> tuple[Attrs, ...]:
    combos = all_combos()
    rng = random.Random(HELDOUT_SEED)
    rng.shuffle(combos)
    return tuple(sorted(combos[:NUM_HELDOUT], key=lambda a: a.caption))


HELDOUT_COMBOS: tuple[Attrs, ...] = _heldout()
_HELDOUT_SET = frozenset(HELDOUT_COMBOS)
TRAIN_COMBOS: tuple[Attrs, ...] = tuple(a for a in all_combos() if a not in _HELDOUT_SET)


def heldout_prompts() -> list[str]:
    """The 50 held-out captions (attribute combinations never used in training), in a fixed order."""
    return [a.caption for a in HELDOUT_COMBOS]


def heldout_eval_set(seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, generation seed) pairs used by the evaluation: one seed per held-out prompt."""
    return [(p, seed + i) for i, p in enumerate(heldout_prompts())]


# ----------------------------------------------------------------------------------------------------------------
# rendering


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx, cy) with half-size r (pixel units)."""
    n = size * ss
    coords = (np.arange(n, dtype=np.float32) + 0.5) / ss
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "square":
        h = r * 0.9
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":
        # apex up, base down; bounding box [cx-r, cx+r] x [cy-r, cy+r]
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        m = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


# area / r^2 of _shape_mask's shapes, and how far their centroid lies below the box centre (in units of r)
SHAPE_AREA = {"circle": math.pi, "square": 1.8**2, "triangle": 2.0}
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def trajectory(a: Attrs, rng: np.random.Generator, num_frames: int, size: int,
               half_size: tuple[float, float] = HALF_SIZE, speed: float = SPEED) -> list[tuple[float, float, float]]:
    """Per-frame (cx, cy, r) in pixels for the motion of ``a``; random start drawn from ``rng``.

    ``half_size`` is the range of r (at 32x32) for moving and still shapes; larger shapes leave less room to
    place them, so their start positions vary less (see :func:`max_half_size`). ``speed`` is the distance (pixels
    per frame at 32x32) that moving shapes travel.
    """
    s = size / DEFAULT_SIZE
    speed = speed * s
    margin = 1.0 * s
    if a.motion in ("growing", "shrinking"):
        r0, r1 = 3.5 * s, 9.5 * s
        if a.motion == "shrinking":
            r0, r1 = r1, r0
        rmax = max(r0, r1)
        cx = rng.uniform(rmax + margin, size - rmax - margin)
        cy = rng.uniform(rmax + margin, size - rmax - margin)
        return [(cx, cy, r0 + (r1 - r0) * i / max(num_frames - 1, 1)) for i in range(num_frames)]
    r = rng.uniform(*half_size) * s
    lo, hi = r + margin, size - r - margin
    travel = speed * (num_frames - 1)
    if a.motion == "still":
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        return [(cx, cy, r)] * num_frames
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[a.motion]
    along = rng.uniform(lo, max(lo, hi - travel))
    across = rng.uniform(lo, hi)
    out = []
    for i in range(num_frames):
        p = along + speed * i
        if dx:
            cx = p if dx > 0 else size - p
            out.append((cx, across, r))
        else:
            cy = p if dy > 0 else size - p
            out.append((across, cy, r))
    return out


def max_half_size(num_frames: int = DEFAULT_FRAMES, speed: float = SPEED) -> float:
    """Largest half-size (at 32x32) whose shapes moving at ``speed`` stay inside the frame for ``num_frames`` frames."""
    return (DEFAULT_SIZE - 2.0 - speed * (num_frames - 1)) / 2.0


def render_clip(
    a: Attrs, seed: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    half_size: tuple[float, float] = HALF_SIZE, speed: float = SPEED,
) -> torch.Tensor:
    """Render one clip as a float32 tensor (T, H, W, 3) in [-1, 1]. Deterministic in its arguments."""
    rng = np.random.default_rng(seed)
    bg = np.asarray(BACKGROUNDS[a.background], dtype=np.float32) / 127.5 - 1.0
    fg = np.asarray(COLOURS[a.colour], dtype=np.float32) / 127.5 - 1.0
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    for i, (cx, cy, r) in enumerate(trajectory(a, rng, num_frames, size, half_size, speed)):
        m = _shape_mask(a.shape, cx, cy, r, size)[..., None]
        frames[i] = bg * (1.0 - m) + fg * m
    return torch.from_numpy(frames)


def shape_contrast(
    a: Attrs, seed: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    half_size: tuple[float, float] = HALF_SIZE, speed: float = SPEED,
) -> torch.Tensor:
    """Where the outline of :func:`render_clip`'s shape tells it apart: (T, H, W) in [0, 1].

    Per pixel, the largest coverage difference between the clip's shape and each other shape of equal area and
    the same centroid, i.e. the corners, tips and arcs a model must draw to show *which* shape it is. Same
    ``(a, seed, ...)`` as :func:`render_clip`, so it lines up with that clip.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((num_frames, size, size), dtype=np.float32)
    for i, (cx, cy, r) in enumerate(trajectory(a, rng, num_frames, size, half_size, speed)):
        own = _shape_mask(a.shape, cx, cy, r, size)
        area, centroid_y = SHAPE_AREA[a.shape] * r * r, cy + CENTROID_DROP[a.shape] * r
        diffs = []
        for other in SHAPES:
            if other != a.shape:
                ro = math.sqrt(area / SHAPE_AREA[other])
                diffs.append(np.abs(own - _shape_mask(other, cx, centroid_y - CENTROID_DROP[other] * ro, ro, size)))
        out[i] = np.maximum.reduce(diffs)
    return torch.from_numpy(out)


def sample_attrs(rng: random.Random, include_heldout: bool = False) -> Attrs:
    pool = all_combos() if include_heldout else TRAIN_COMBOS
    return pool[rng.randrange(len(pool))]


def sample_batch(
    seed: int, batch_size: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    include_heldout: bool = False, half_size: tuple[float, float] = HALF_SIZE, speed: float = SPEED,
) -> tuple[list[str], torch.Tensor]:
    """A reproducible training batch: captions and clips (B, 3, T, H, W) in [-1, 1] (the transformer's layout)."""
    specs = batch_specs(seed, batch_size, include_heldout)
    clips = [render_clip(a, clip_seed, num_frames, size, half_size, speed) for a, clip_seed in specs]
    return [a.caption for a, _ in specs], torch.stack(clips).permute(0, 4, 1, 2, 3).contiguous()


def batch_specs(seed: int, batch_size: int, include_heldout: bool = False) -> list[tuple[Attrs, int]]:
    """(attributes, clip seed) of each clip of :func:`sample_batch` ``(seed, batch_size, ...)``."""
    rng = random.Random(seed)
    specs = []
    for _ in range(batch_size):
        a = sample_attrs(rng, include_heldout)
        specs.append((a, rng.randrange(2**31)))
    return specs


def iter_pairs(seed: int = 0, n: int | None = None, include_heldout: bool = True, **kw):
    """Yield (caption, clip (T, H, W, 3) in [-1, 1]) pairs, reproducibly; endless when ``n`` is None."""
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        a = sample_attrs(rng, include_heldout)
        yield a.caption, render_clip(a, rng.randrange(2**31), **kw)
        i += 1


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) in [-1, 1] -> uint8 array."""
    return ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
