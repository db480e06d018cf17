"""Fidelity of a sparse run against the dense run with the same seed (scikit-image's PSNR and SSIM)."""

from __future__ import annotations

import numpy as np


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


def ssim(reference, test) -> float:
    """Mean SSIM over frames (colour channels averaged)."""
    from skimage.metrics import structural_similarity

    ref, tst = to_uint8_video(reference), to_uint8_video(test)
    win = min(7, ref.shape[1], ref.shape[2])
    win -= (win + 1) % 2  # odd window that fits
    return float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win)
                          for a, b in zip(ref, tst)]))


def format_metric(value, spec: str) -> str:
    """A table cell: "n/a" for a missing value, "exact" for an infinite one (identical videos), else `spec`."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not np.isfinite(value):
        return "exact"
    return format(value, spec)
