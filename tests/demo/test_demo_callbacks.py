"""The page's callbacks called directly: a good request, every kind of bad input, the cache, and concurrency."""

import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from dit_sparse.plan import ModelFingerprint, SparsePlan

# inputs: prompt, seed, steps, guidance, resolution, frames, plan source, shipped plan, plan file, strategy, knob
PROMPT, SEED, STEPS, GUIDANCE, RESOLUTION, FRAMES, SOURCE, SHIPPED, FILE, STRATEGY, KNOB = range(11)


def with_(inputs, **changes):
    out = list(inputs)
    for name, value in changes.items():
        out[globals()[name.upper()]] = value
    return out


def error_of(callbacks, inputs) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        callbacks.compare(*inputs)
    return info.value.message


def test_good_request_returns_videos_pictures_and_metrics(callbacks, small):
    dense, sparse, side, heat, table, plan_png, raw, status = callbacks.compare(*small)
    for path in (dense, sparse, side):
        assert Path(path).suffix == ".mp4" and Path(path).stat().st_size > 0
    import imageio.v3 as iio

    frames = iio.imread(dense)
    assert frames.shape == (4, 256, 256, 3)  # 32x32 upscaled to 256 for the page
    side_frames = iio.imread(side)  # dense | sparse, under a caption band that names each half
    band = side_frames.shape[1] - 256
    assert side_frames.shape == (4, 256 + band, 512, 3) and 0 < band < 128 and side_frames.shape[1] % 2 == 0
    assert np.abs(side_frames[:, band:, :256].astype(int) - frames).mean() < 8
    from dit_sparse.video import side_by_side

    caption = side_frames[:, :band].astype(int)
    labelled = side_by_side(np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)))[0, :band].astype(int)
    assert caption.max() - caption.min() > 150 and np.abs(caption - labelled).mean() < 4
    for path in (heat, plan_png):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = dict(table.values.tolist())
    assert list(table.columns) == ["metric", "value"]
    for key in ("total time, dense (s)", "total time, sparse (s)", "speedup (total)", "attention time, dense (s)",
                "attention time, sparse (s)", "executed attention density", "PSNR sparse vs dense (dB)",
                "SSIM sparse vs dense", "caption check, dense", "caption check, sparse"):
        assert key in rows
    assert raw["dense_seconds"] > 0 and raw["sparse_seconds"] > 0
    assert 0 < raw["executed_attention_density"] < 1  # the shipped plan's windows skip work at this size
    assert rows["executed attention density"] == f"{100 * raw['executed_attention_density']:.1f}%"
    assert rows["total time, dense (s)"] == f"{raw['dense_seconds']:.3f}"
    assert rows["caption check, dense"] in ("pass", "fail") and isinstance(raw["dense_caption_ok"], bool)
    assert math.isfinite(raw["psnr"]) and 0 < raw["ssim"] <= 1
    assert json.dumps(raw)  # JSON-safe for the API
    assert "Done in" in status or "cache" in status


def test_uniform_strategy_knob_controls_density(callbacks, backend, small):
    densities = []
    for knob in (0.1, 0.5):
        inputs = with_(small, source="uniform strategy", strategy="diagonal", knob=knob)
        densities.append(callbacks.compare(*inputs)[6]["executed_attention_density"])
    assert densities[0] < densities[1]


def test_prompt_outside_the_grammar_runs_without_caption_check(callbacks, small):
    raw, table = (lambda out: (out[6], dict(out[4].values.tolist())))(
        callbacks.compare(*with_(small, prompt="a cat playing the piano")))
    assert raw["dense_caption_ok"] is None and "caption_check" in raw
    assert table["caption check, dense"].startswith("n/a")


def broken_plans(tmp_path):
    not_json = tmp_path / "broken.plan.json"
    not_json.write_text('{"format": "dit-sparse-plan", "version": 1,')
    wrong_format = tmp_path / "wrong.plan.json"
    wrong_format.write_text(json.dumps({"format": "something-else", "version": 1}))
    bad_strategy = tmp_path / "bad-strategy.plan.json"
    plan = SparsePlan(ModelFingerprint("WanTransformer3DModel", 4, 4, 32)).to_json()
    plan["modules"] = {"blocks.1.attn1": {"strategy": "wiggle"}}
    bad_strategy.write_text(json.dumps(plan))
    other_model = SparsePlan(ModelFingerprint("WanTransformer3DModel", 30, 12, 128)).save(tmp_path / "wan.plan.json")
    binary = tmp_path / "binary.plan.json"
    binary.write_bytes(bytes(range(256)))
    return {"not JSON": (not_json, "not valid JSON"), "wrong format": (wrong_format, "$.format"),
            "unknown strategy": (bad_strategy, "unknown strategy 'wiggle'"),
            "another model": (other_model, "num_layers: plan has 30, model has 4"),
            "binary": (binary, "not a text")}


BAD_INPUTS = {
    "empty prompt": (dict(prompt=""), "prompt is empty"),
    "blank prompt": (dict(prompt="   \n "), "prompt is empty"),
    "prompt too long": (dict(prompt="a " * 400), "prompt is too long"),
    "negative seed": (dict(seed=-1), "seed must be from 0"),
    "fractional seed": (dict(seed=1.5), "seed must be a whole number"),
    "zero steps": (dict(steps=0), "steps must be from 1 to 50"),
    "too many steps": (dict(steps=51), "steps must be from 1 to 50"),
    "steps not a number": (dict(steps="many"), "steps must be a whole number"),
    "negative guidance": (dict(guidance=-1), "guidance must be from 0"),
    "odd resolution": (dict(resolution="33x33"), "cannot take 33x33: height and width must be multiples of 2"),
    "resolution too large": (dict(resolution="512x512"), "outside what this demo allows"),
    "resolution not HxW": (dict(resolution="big"), "resolution must be HEIGHTxWIDTH"),
    "too many tokens for the CPU": (dict(resolution="64x64", frames=16), "16384 tokens, more than this demo runs"),
    "zero frames": (dict(frames=0), "frames must be from 1 to 16"),
    "too many frames": (dict(frames=17), "frames must be from 1 to 16"),
    "unknown plan source": (dict(source="magic"), "plan source must be one of"),
    "unknown shipped plan": (dict(shipped="nope.plan.json"), "unknown shipped plan"),
    "no upload": (dict(source="upload a plan", file=None), "no plan file uploaded"),
    "unknown strategy": (dict(source="uniform strategy", strategy="wiggle"), "unknown strategy 'wiggle'"),
    "knob out of range": (dict(source="uniform strategy", strategy="diagonal", knob=0), "density knob must be in"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(callbacks, backend, small, case):
    changes, message = BAD_INPUTS[case]
    runs = backend.runs
    assert message in error_of(callbacks, with_(small, **changes))
    assert backend.runs == runs  # refused before anything ran


@pytest.mark.parametrize("case", ["not JSON", "wrong format", "unknown strategy", "another model", "binary"])
def test_broken_plan_upload_is_a_clear_error(callbacks, small, tmp_path, case):
    path, message = broken_plans(tmp_path)[case]
    inputs = with_(small, source="upload a plan", file=str(path))
    assert message in error_of(callbacks, inputs)
    import gradio as gr

    with pytest.raises(gr.Error, match="uploaded plan"):  # the plan picture says the same as soon as it is uploaded
        callbacks.preview("upload a plan", None, str(path), None, 0.25, "32x32", 4)


def test_the_pipeline_refusing_is_a_clear_error(callbacks, backend, small, monkeypatch):
    """Whatever the pipeline itself refuses reaches the page as a message, and the model is left usable."""
    monkeypatch.setattr(backend, "limits", dataclasses.replace(backend.limits, multiple=1))  # let 31x31 through
    message = error_of(callbacks, with_(small, resolution="31x31"))
    assert "refused these settings" in message and "multiples of the patch size" in message
    monkeypatch.undo()
    assert callbacks.compare(*with_(small, seed=5))[6]["dense_seconds"] > 0


def test_unexpected_failure_is_a_message_not_a_traceback(callbacks, backend, small, monkeypatch):
    import gradio as gr

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("dit_sparse.demo.backend.compare_dense_sparse", boom)
    with pytest.raises(gr.Error, match="failed unexpectedly.*RuntimeError: out of memory"):
        callbacks.compare(*with_(small, seed=99))
    monkeypatch.undo()
    assert backend._lock.acquire(blocking=False)  # the lock was released
    backend._lock.release()


def test_uploaded_plan_runs_and_is_keyed_by_content(callbacks, backend, small, tmp_path):
    shipped = Path(backend.shipped_plans["tiny-shapes.plan.json"])
    copy = tmp_path / "my-plan.plan.json"
    copy.write_text(shipped.read_text())
    by_shipped = callbacks.compare(*with_(small, seed=11))
    hits = backend.cache_hits
    by_upload = callbacks.compare(*with_(small, seed=11, source="upload a plan", file=str(copy)))
    assert backend.cache_hits == hits + 1  # same plan content, same request
    assert by_upload[6] == by_shipped[6]


def test_progress_reports_dense_then_sparse_steps(callbacks, small):
    import gradio as gr

    class Recorder(gr.Progress):  # what gradio passes in; empty, it is falsy (len 0)
        def __init__(self):
            super().__init__()
            self.calls = []

        def __call__(self, progress, desc=None, **kwargs):
            self.calls.append((progress, desc))

    recorder = Recorder()
    callbacks.compare(*with_(small, seed=51), progress=recorder)
    descs = [d for _, d in recorder.calls]
    assert {f"{way}: step {i}/3" for way in ("dense", "sparse") for i in (1, 2, 3)} <= set(descs)
    fractions = [f for f, _ in recorder.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_preview_draws_the_plan_for_each_source(callbacks, tmp_path):
    for args in (("shipped plan", "tiny-shapes.plan.json", None, None, 0.25),
                 ("uniform strategy", None, None, "block_adaptive", 0.3),
                 ("uniform strategy", None, None, "pyramid", 0.5)):
        path = callbacks.preview(*args, "32x32", 8)
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert callbacks.preview("upload a plan", None, None, None, 0.25, "32x32", 8) is None  # waiting for a file
    assert callbacks.preview("shipped plan", "tiny-shapes.plan.json", None, None, 0.25, "bad", 8)  # no densities


# ---------------------------------------------------------------------------------------------------------------
# cache


def test_identical_request_is_served_from_the_cache(backend, callbacks, small):
    first = callbacks.compare(*with_(small, seed=21))
    runs, hits = backend.runs, backend.cache_hits
    again = callbacks.compare(*with_(small, seed=21, prompt="  a red circle moving right   on a dark background "))
    assert (backend.runs, backend.cache_hits) == (runs, hits + 1)
    assert again[:4] == first[:4] and again[5:7] == first[5:7]  # the same files and metrics
    assert again[4].equals(first[4])
    assert "cache" in again[7]
    callbacks.compare(*with_(small, seed=22))  # another seed is another request
    callbacks.compare(*with_(small, seed=21, guidance=3.0))  # and so is another guidance
    assert backend.runs == runs + 2


def shipped_architecture():
    """An untrained pipeline with the shipped weights' architecture (coordinate channels), which the shipped plan
    names, built in a second instead of loaded."""
    from dit_sparse.zoo import TinyShapesConfig, build_pipeline

    return build_pipeline(TinyShapesConfig(coordinate_channels=True))


def test_cache_is_a_bounded_lru():
    from dit_sparse.demo.backend import DemoBackend

    b = DemoBackend(pipe=shipped_architecture(), cache_size=2)
    try:
        plan, _ = b.resolve_plan("shipped plan", "tiny-shapes.plan.json")
        requests = [b.make_request("a red circle moving right on a dark background", seed, 1, 4.5, "16x16", 2, plan)
                    for seed in range(3)]
        first = b.run(requests[0], plan)
        b.run(requests[1], plan)
        assert b.run(requests[0], plan).cached  # 0 is now the most recently used
        b.run(requests[2], plan)  # evicts 1, the least recently used
        assert b.cached(requests[0]) is not None and b.cached(requests[2]) is not None
        assert b.cached(requests[1]) is None
        assert b.runs == 3 and Path(first.dense_video).exists()
        again = b.run(requests[1], plan)
        assert not again.cached and b.runs == 4
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------------------------
# concurrency


def test_two_requests_at_once_both_complete_with_correct_results(small):
    """Two visitors at once on one backend: both finish, and each gets exactly what it gets alone."""
    from dit_sparse.demo.app import Callbacks
    from dit_sparse.demo.backend import DemoBackend

    requests = [with_(small, seed=31), with_(small, seed=32, prompt="a blue square moving up on a light background")]
    shared = DemoBackend(pipe=shipped_architecture())
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def visitor(i):
        try:
            barrier.wait()
            results[i] = Callbacks(shared).compare(*requests[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(r is not None for r in results)
    assert shared.runs == 2
    concurrent = [shared.cached(shared.make_request(*r[:6], shared.resolve_plan(*r[6:])[0])) for r in requests]

    alone = DemoBackend(pipe=shipped_architecture())
    try:
        for i, req in enumerate(requests):
            out = Callbacks(alone).compare(*req)
            single = alone.cached(alone.make_request(*req[:6], alone.resolve_plan(*req[6:])[0]))
            assert concurrent[i].digest == single.digest  # identical dense and sparse frames
            for key in ("psnr", "ssim", "executed_attention_density", "dense_caption_ok", "sparse_caption_ok"):
                assert results[i][6][key] == out[6][key]
        assert concurrent[0].digest != concurrent[1].digest
        assert not np.isclose(results[0][6]["psnr"], results[1][6]["psnr"])
    finally:
        shared.close()
        alone.close()
