"""The result of one dense/sparse comparison of the demo page, its metrics as the page's table, and the cache of
the results of identical requests."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import Request


@dataclass(frozen=True)
class Result:
    dense_video: str
    sparse_video: str
    side_by_side_video: str
    heatmap: str
    plan_picture: str
    metrics: dict[str, Any]
    table: list[list[str]]
    seconds: float  # wall time of the run that made this result
    digest: str  # sha256 of the dense and sparse frames: equal digests, equal outputs
    cached: bool = False


def _fmt_seconds(v: float) -> str:
    return f"{v:.3f}"


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _fmt_caption(ok: bool | None, metrics: dict[str, Any]) -> str:
    if ok is None:
        return "n/a (prompt outside the tiny-shapes grammar)" if "caption_check" in metrics else "n/a"
    return "pass" if ok else "fail"


def metrics_table(metrics: dict[str, Any], tiny_shapes: bool = True) -> list[list[str]]:
    """The rows of the page's metrics table, as the strings shown there."""
    psnr = metrics["psnr"]
    rows = [
        ["total time, dense (s)", _fmt_seconds(metrics["dense_seconds"])],
        ["total time, sparse (s)", _fmt_seconds(metrics["sparse_seconds"])],
        ["speedup (total)", _fmt_ratio(metrics["speedup"])],
        ["attention time, dense (s)", _fmt_seconds(metrics["dense_attention_seconds"])],
        ["attention time, sparse (s)", _fmt_seconds(metrics["sparse_attention_seconds"])],
        ["attention speedup", _fmt_ratio(metrics.get("attention_speedup"))],
        ["executed attention density", f"{100 * metrics['executed_attention_density']:.1f}%"],
        ["PSNR sparse vs dense (dB)", "inf (identical)" if not math.isfinite(psnr) else f"{psnr:.2f}"],
        ["SSIM sparse vs dense", f"{metrics['ssim']:.4f}" if metrics.get("ssim") is not None
         else f"n/a ({metrics.get('ssim_note') or 'not measured'})"],
    ]
    if tiny_shapes:
        rows.append(["caption check, dense", _fmt_caption(metrics.get("dense_caption_ok"), metrics)])
        rows.append(["caption check, sparse", _fmt_caption(metrics.get("sparse_caption_ok"), metrics)])
    return rows


def frames_digest(dense: np.ndarray, sparse: np.ndarray) -> str:
    h = hashlib.sha256()
    for video in (dense, sparse):
        h.update(np.ascontiguousarray(video, dtype=np.float32).tobytes())
    return h.hexdigest()


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for a JSON output: non-finite floats become strings ("inf")."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class ResultCache:
    """The newest `size` results by request (least recently used dropped first, with its output folder). Not
    thread-safe: the backend calls it under its lock."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self._results: OrderedDict[Request, Result] = OrderedDict()

    def get(self, request: Request) -> Result | None:
        """The cached result of `request` (marked cached), or None."""
        hit = self._results.get(request)
        if hit is None:
            return None
        self._results.move_to_end(request)
        self.hits += 1
        return replace(hit, cached=True)

    def put(self, request: Request, result: Result) -> None:
        self._results[request] = result
        while len(self._results) > self.size:
            _, old = self._results.popitem(last=False)
            shutil.rmtree(Path(old.dense_video).parent, ignore_errors=True)
