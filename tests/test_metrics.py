"""Fidelity metrics on edge cases: a value, or None with a reason, never an exception."""

import json
import math

import numpy as np
import pytest

from dit_sparse.atomic import write_json
from dit_sparse.metrics import PSNR_EXACT, for_json, psnr, ssim, ssim_unavailable


def _video(shape, seed=0):
    return np.random.default_rng(seed).random(shape)


@pytest.mark.parametrize("height,width", [(2, 2), (1, 8), (8, 2), (1, 1)])
def test_ssim_of_frames_smaller_than_its_window_is_none_with_a_reason(height, width):
    a, b = _video((2, height, width, 3)), _video((2, height, width, 3), seed=1)
    assert ssim(a, b) is None
    assert ssim_unavailable(a.shape).startswith(f"frames too small for SSIM ({width}x{height}")


@pytest.mark.parametrize("height,width", [(3, 3), (4, 5), (6, 40), (16, 16)])
def test_ssim_of_small_frames_uses_a_smaller_odd_window(height, width):
    a = _video((2, height, width, 3))
    b = np.clip(a + 0.05 * _video(a.shape, seed=1), 0, 1)
    value = ssim(a, b)
    assert value is not None and -1 <= value <= 1 and ssim(a, a) == pytest.approx(1.0)
    assert ssim_unavailable(a.shape) is None


def test_an_exact_psnr_is_written_as_null_with_a_reason():
    a = _video((1, 4, 4, 3))
    assert psnr(a, a) == math.inf
    metrics = for_json({"psnr": psnr(a, a), "ssim": 1.0})
    assert metrics == {"psnr": None, "psnr_note": PSNR_EXACT, "ssim": 1.0}


def test_result_files_are_strict_json(tmp_path, caplog):
    path = write_json(tmp_path / "r.json", {"a": [1.0, math.nan], "b": {"c": -math.inf}}, finite=True)
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"a": [1.0, None],
                                                                                     "b": {"c": None}}
    assert "r.json:a[1]: nan is not a JSON number" in caplog.text
