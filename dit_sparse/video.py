"""Writing clips: an mp4 upscaled to be visible, and two clips side by side under captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import WriteError, atomic_path
from .metrics import to_uint8_video

SHOWN_HEIGHT = 256  # write_video upscales tiny clips (nearest, an integer factor) to about this height, to be visible


LABELLED_MIN_WIDTH = 96  # each half of a side-by-side clip is at least this wide, so that its label fits


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An mp4, written atomically: a failed write (a full disk, ffmpeg failing) leaves no file, not a 0-byte one,
    and raises WriteError naming `path`."""
    import imageio.v2 as imageio

    video = to_uint8_video(frames)
    scale = max(1, SHOWN_HEIGHT // video.shape[1])
    video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    with atomic_path(path, keep_suffix=True) as tmp:
        try:
            imageio.mimwrite(str(tmp), list(video), fps=fps, macro_block_size=1)
        except (RuntimeError, ValueError) as e:  # imageio-ffmpeg reports a failed encode this way
            raise WriteError(path, e) from e


def side_by_side(left, right, labels: tuple[str, str] = ("dense", "sparse")) -> np.ndarray:
    """Two clips (T, H, W, 3), uint8 or float in [0, 1], side by side as one uint8 clip, each half under a caption
    band (white text on black, added above the picture, not over it) that names it, so that side_by_side.mp4 says
    which half is which to a person who opens it alone.

    Each half is first upscaled (nearest neighbour, one integer factor) to the height write_video shows a clip at,
    and to at least LABELLED_MIN_WIDTH wide: the label is readable on a 16x16 clip, each half below its band is its
    own video's picture pixel for pixel, and write_video leaves the result at its size. The band's height does not
    depend on the labels; the total height and width are even (libx264, yuv420p)."""
    from PIL import Image, ImageDraw, ImageFont

    left, right = to_uint8_video(left), to_uint8_video(right)
    if left.shape != right.shape or left.ndim != 4 or left.shape[-1] != 3:
        raise ValueError(f"side_by_side needs two (T, H, W, 3) clips of one shape, not {left.shape} and {right.shape}")
    _, height, width, _ = left.shape
    scale = max(1, SHOWN_HEIGHT // height, -(-LABELLED_MIN_WIDTH // width))
    height, width = height * scale, width * scale
    size = max(10, min(48, width // 9))
    try:
        font = ImageFont.load_default(size=size)  # FreeType (Pillow >= 10.1): Aileron at this size
        zoom = 1
    except (TypeError, ImportError, OSError):  # older Pillow, or no FreeType: the bitmap font (11 px), enlarged
        font = ImageFont.load_default()
        zoom = max(1, size // 11)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    top, bottom = probe.textbbox((0, 0), "Hdgjpy", font=font)[1::2]  # ascenders and descenders, whatever the label
    pad = max(2, size // 4 // zoom)
    shape = (-(-width // zoom), bottom - top + 2 * pad)  # the band before the zoom: (width, height)
    odd = (height + shape[1] * zoom) % 2  # one more black row keeps the total height even
    bands = []
    for label in labels:
        x0, _, x1, _ = probe.textbbox((0, 0), label, font=font)
        image = Image.new("L", shape, 0)
        ImageDraw.Draw(image).text(((shape[0] - (x1 - x0)) // 2 - x0, pad - top), label, fill=255, font=font)
        band = np.pad(np.asarray(image).repeat(zoom, axis=0).repeat(zoom, axis=1)[:, :width], ((odd, 0), (0, 0)))
        bands.append(np.repeat(band[:, :, None], 3, axis=2))
    halves = [np.concatenate([np.broadcast_to(b, (len(v), *b.shape)), v.repeat(scale, axis=1).repeat(scale, axis=2)],
                             axis=1) for b, v in zip(bands, (left, right))]
    return np.concatenate(halves, axis=2)
