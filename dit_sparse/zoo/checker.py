"""Caption checker for tiny-shapes clips: plain image analysis, no learned model.

Given a clip (T, H, W, 3) it estimates

- background: median colour of a 2-pixel border ring, per frame -> nearest background of the grammar;
- foreground mask: pixels whose distance to the background exceeds half the object/background contrast,
  keeping the largest connected component per frame (tolerates speckle and blur);
- colour: median foreground colour -> nearest colour of the palette;
- shape: the soft mask (distance to the background over the contrast, near the object) is compared with
  circle, square and triangle templates of the same area centred on its centroid; the smallest summed L1
  error over the frames where the object is large enough wins (robust to blur, unlike a bounding-box fill ratio);
- motion: log-area slope over time (growing / shrinking), otherwise the centroid track's fitted displacement
  (left / right / up / down, or still when it moves less than a few pixels).

:func:`check_clip` compares that with a caption; a clip passes when colour, shape, motion and background all
match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.ndimage import binary_dilation

from .shapes_data import BACKGROUNDS, COLOURS, Attrs, _shape_mask, parse_caption

_PALETTE = {k: np.asarray(v, dtype=np.float32) / 255.0 for k, v in COLOURS.items()}
_BGS = {k: np.asarray(v, dtype=np.float32) / 255.0 for k, v in BACKGROUNDS.items()}

# area of each template for half-size r, in units of r**2 (see shapes_data._shape_mask)
_SHAPE_AREA = {"circle": float(np.pi), "square": 4 * 0.9**2, "triangle": 2.0}

# thresholds (pixel quantities are for 32x32 and scale with the frame size)
AREA_RATIO_CHANGE = 1.8  # last/first fitted area ratio that counts as growing (or 1/x shrinking)
MIN_TRAVEL_PX = 3.5
MIN_SHAPE_AREA_PX = 24


@dataclass
class CheckResult:
    ok: bool
    expected: dict
    found: dict
    matches: dict
    features: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def to_float01(clip) -> np.ndarray:
    """Accept (T, H, W, 3) or (T, 3, H, W), uint8 / [0, 1] float / [-1, 1] float, numpy or torch."""
    if hasattr(clip, "detach"):
        clip = clip.detach().cpu().float().numpy()
    x = np.asarray(clip)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a clip (T, H, W, 3), got shape {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < -0.05:
        x = (x + 1.0) / 2.0
    elif x.max() > 1.5:
        x = x / 255.0
    return np.clip(x, 0.0, 1.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from skimage.measure import label

    if not mask.any():
        return mask
    lab = label(mask, connectivity=2)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == counts.argmax()


def analyze_clip(clip) -> tuple[dict, dict]:
    """Return (found attributes, features) for a clip; attributes may be None when nothing is visible."""
    x = to_float01(clip)
    t, h, w, _ = x.shape
    scale = h / 32.0
    ring = np.ones((h, w), bool)
    ring[2:-2, 2:-2] = False
    bg = np.median(x[:, ring, :], axis=1)  # (T, 3)
    bg_all = np.median(bg, axis=0)
    background = min(_BGS, key=lambda k: float(np.sum((_BGS[k] - bg_all) ** 2)))

    dist = np.linalg.norm(x - bg[:, None, None, :], axis=-1)  # (T, H, W)
    cand = dist > 0.3
    if cand.sum() < 4:
        return {"colour": None, "shape": None, "motion": None, "background": background}, {"visible": False}
    fg = np.median(x[cand], axis=0)
    contrast = float(np.linalg.norm(fg - bg_all))
    thr = max(0.5 * contrast, 0.15)
    masks = np.stack([_largest_component(dist[i] > thr) for i in range(t)])
    areas = masks.sum(axis=(1, 2)).astype(np.float64)
    if (areas > 0).sum() == 0:
        return {"colour": None, "shape": None, "motion": None, "background": background}, {"visible": False}

    fg_col = np.median(x[masks], axis=0)
    colour = min(_PALETTE, key=lambda k: float(np.sum((_PALETTE[k] - fg_col) ** 2)))

    # shape: match area-equal templates (circle / square / triangle) to the soft mask, centred on its centroid
    soft = np.clip(dist / max(contrast, 1e-3), 0.0, 1.0)
    errs = {s: 0.0 for s in _SHAPE_AREA}
    fills, used = [], 0
    for i in range(t):
        if areas[i] < MIN_SHAPE_AREA_PX * scale * scale:
            continue
        near = binary_dilation(masks[i], iterations=max(1, int(round(2 * scale))))
        m = soft[i] * near
        ys, xs = np.nonzero(masks[i])
        fills.append(areas[i] / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        a = float(m.sum())
        yy, xx = np.mgrid[0:h, 0:w]
        cy0 = float((m * (yy + 0.5)).sum() / a)
        cx0 = float((m * (xx + 0.5)).sum() / a)
        for s, k in _SHAPE_AREA.items():
            r = float(np.sqrt(a / k))
            cy_s = cy0 - r / 3.0 if s == "triangle" else cy0  # a triangle's centroid is r/3 below its box centre
            tmpl = _shape_mask(s, cx0, cy_s, r, max(h, w))[:h, :w]
            errs[s] += float(np.abs(tmpl - m).sum()) / a
        used += 1
    if used:
        shape = min(errs, key=errs.get)
        fill = float(np.median(fills))
    else:
        fill, shape = None, None
    feats_shape = {s: round(e / max(used, 1), 4) for s, e in errs.items()}

    vis = areas > 0
    idx = np.nonzero(vis)[0].astype(np.float64)
    feats = {"visible": True, "fill_ratio": fill, "fg_colour": [round(float(c), 3) for c in fg_col],
             "bg_colour": [round(float(c), 3) for c in bg_all], "areas": areas.tolist(),
             "shape_errors": feats_shape}
    if vis.sum() < 2:
        return {"colour": colour, "shape": shape, "motion": None, "background": background}, feats
    la = np.log(areas[vis])
    slope_a = np.polyfit(idx, la, 1)[0]
    area_ratio = float(np.exp(slope_a * (t - 1)))
    cy = np.array([np.nonzero(m)[0].mean() for m in masks[vis]])
    cx = np.array([np.nonzero(m)[1].mean() for m in masks[vis]])
    dx = float(np.polyfit(idx, cx, 1)[0] * (t - 1))
    dy = float(np.polyfit(idx, cy, 1)[0] * (t - 1))
    feats.update(area_ratio=area_ratio, dx=dx, dy=dy)
    if area_ratio >= AREA_RATIO_CHANGE:
        motion = "growing"
    elif area_ratio <= 1.0 / AREA_RATIO_CHANGE:
        motion = "shrinking"
    elif max(abs(dx), abs(dy)) < MIN_TRAVEL_PX * scale:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return {"colour": colour, "shape": shape, "motion": motion, "background": background}, feats


def check_clip(clip, caption: str | Attrs) -> CheckResult:
    """Does ``clip`` show ``caption``'s colour, shape, motion and background?"""
    a = caption if isinstance(caption, Attrs) else parse_caption(caption)
    expected = {"colour": a.colour, "shape": a.shape, "motion": a.motion, "background": a.background}
    found, feats = analyze_clip(clip)
    matches = {k: found[k] == v for k, v in expected.items()}
    return CheckResult(ok=all(matches.values()), expected=expected, found=found, matches=matches, features=feats)


def checker_accuracy(n: int = 300, seed: int = 123, blur_sigma: float = 0.0, noise_std: float = 0.0) -> dict:
    """Accuracy of the checker on ground-truth clips of the generator (optionally blurred / noised)."""
    from .shapes_data import iter_pairs

    rng = np.random.default_rng(seed)
    ok = 0
    per_attr = {"colour": 0, "shape": 0, "motion": 0, "background": 0}
    failures = []
    for cap, clip in iter_pairs(seed=seed, n=n, include_heldout=True):
        x = (clip.numpy() + 1.0) / 2.0
        if blur_sigma > 0:
            from scipy.ndimage import gaussian_filter

            x = gaussian_filter(x, sigma=(0, blur_sigma, blur_sigma, 0))
        if noise_std > 0:
            x = np.clip(x + rng.normal(0, noise_std, x.shape), 0, 1)
        r = check_clip(x, cap)
        ok += r.ok
        for k in per_attr:
            per_attr[k] += r.matches[k]
        if not r.ok and len(failures) < 10:
            failures.append({"caption": cap, "found": r.found})
    return {"n": n, "accuracy": ok / n, "per_attribute": {k: v / n for k, v in per_attr.items()},
            "blur_sigma": blur_sigma, "noise_std": noise_std, "failures": failures}
