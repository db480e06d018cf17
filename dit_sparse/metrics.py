"""Fidelity of a sparse run against the dense run with the same seed (scikit-image's PSNR and SSIM).

Edge cases give a value or None with a reason, never an exception: identical videos have an infinite PSNR (a result
file writes it as null with the note PSNR_EXACT, since strict JSON has no Infinity), frames smaller than the
smallest SSIM window (3x3) have no SSIM (None, with the reason from `ssim_unavailable`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SSIM_MAX_WIN = 7
SSIM_MIN_WIN = 3  # scikit-image's sample covariance divides by win_size**2 - 1
PSNR_EXACT = "exact: the videos are identical (PSNR is infinite)"


def to_uint8_video(frames) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1] or uint8 -> uint8."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def psnr(reference, test) -> float:
    """PSNR in dB over a whole video; inf when identical."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, tst = to_uint8_video(reference), to_uint8_video(test)
    if np.array_equal(ref, tst):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, tst, data_range=255))


def ssim_window(height: int, width: int) -> int | None:
    """The SSIM window for frames of this size: the largest odd size up to 7 that fits, None below 3x3."""
    win = min(SSIM_MAX_WIN, height, width)
    win -= (win + 1) % 2  # odd
    return win if win >= SSIM_MIN_WIN else None


def ssim_unavailable(shape) -> str | None:
    """Why a (T, H, W, C) video has no SSIM, or None when it has one."""
    _, height, width = tuple(shape)[:3]
    if ssim_window(height, width) is None:
        return f"frames too small for SSIM ({width}x{height}; SSIM needs at least {SSIM_MIN_WIN}x{SSIM_MIN_WIN})"
    return None


def ssim(reference, test) -> float | None:
    """Mean SSIM over frames (colour channels averaged), with a smaller odd window on small frames; None when the
    frames are smaller than 3x3 (see `ssim_unavailable`)."""
    from skimage.metrics import structural_similarity

    ref, tst = to_uint8_video(reference), to_uint8_video(test)
    win = ssim_window(ref.shape[1], ref.shape[2])
    if win is None or len(ref) == 0:
        return None
    return float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win)
                          for a, b in zip(ref, tst)]))


def for_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for a strict-JSON result file: an infinite PSNR becomes null with "psnr_note" PSNR_EXACT (renderers
    show "exact"); any other non-finite PSNR or SSIM becomes null with a note saying what it was."""
    out = dict(metrics)
    for key in ("psnr", "ssim"):
        value = out.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            out[f"{key}_note"] = PSNR_EXACT if key == "psnr" and value > 0 else f"not a number ({value})"
    return out


def is_exact(value, note: str | None = None) -> bool:
    """An exact match: an infinite PSNR (result files before strict JSON) or null with the PSNR_EXACT note."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return True
    return value is None and isinstance(note, str) and note.startswith("exact")


def format_metric(value, spec: str, note: str | None = None) -> str:
    """A table cell: "exact" for an infinite PSNR (identical videos; null with an "exact" note in newer result
    files), "n/a" for a missing value, else `spec`."""
    if is_exact(value, note):
        return "exact"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)
