"""Coordinate input channels (TinyShapesConfig.coordinate_channels): layout, save/load, and sparse plans."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from zoo_helpers import TINY

import dit_sparse
from dit_sparse.plan import SparsePlan
from dit_sparse.zoo import TinyShapesPipeline
from dit_sparse.zoo.model import build_pipeline
from dit_sparse.zoo.transformer import TinyShapesTransformer, coordinate_planes

PROMPT = "a red circle moving left on a dark background"
SMALL = dict(num_inference_steps=2, num_frames=3, height=8, width=10)
COORD = replace(TINY, coordinate_channels=True)


def _gen(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SMALL).frames


def test_coordinate_planes_are_pixel_centres_in_minus_one_to_one():
    p = coordinate_planes(2, 4, 5)
    assert p.shape == (3, 2, 4, 5)
    assert torch.allclose(p[0, :, 0, 0], torch.tensor([-0.5, 0.5]))
    assert torch.allclose(p[1, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(p[2, 0, 0, :], torch.tensor([-0.8, -0.4, 0.0, 0.4, 0.8]))


def test_coordinates_are_channels_three_to_five_of_the_patch_embedding():
    """With the coordinate weights zeroed the model is a stock Wan with the same weights on the clip's channels."""
    model = build_pipeline(COORD, seed=0).transformer.eval()
    assert isinstance(model, TinyShapesTransformer) and model.config.in_channels == 6
    stock = WanTransformer3DModel.from_config({**model.config, "in_channels": 3}).eval()
    state = model.state_dict()
    state["patch_embedding.weight"] = state["patch_embedding.weight"][:, :3]
    stock.load_state_dict(state)
    x = torch.randn(2, 3, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    kw = dict(timestep=torch.full((2,), 500.0), encoder_hidden_states=torch.randn(2, 16, 16), return_dict=False)
    with torch.no_grad():
        with_coords = model(hidden_states=x, **kw)[0]
        model.patch_embedding.weight[:, 3:] = 0
        zeroed = model(hidden_states=x, **kw)[0]
        plain = stock(hidden_states=x, **kw)[0]
    assert with_coords.shape == x.shape
    torch.testing.assert_close(zeroed, plain)
    assert (with_coords - plain).abs().max() > 1e-3  # the coordinates do reach the model


def test_save_load_round_trip_keeps_the_class_and_is_bit_identical(tmp_path):
    pipe = build_pipeline(COORD, seed=0)
    before = _gen(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["dit_sparse.zoo.transformer", "TinyShapesTransformer"]
    loaded = TinyShapesPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded.transformer) is TinyShapesTransformer
    assert before.shape == (1, 3, 8, 10, 3)
    np.testing.assert_array_equal(before, _gen(loaded))


def test_sparse_plans_run_on_the_coordinate_model():
    pipe = build_pipeline(COORD, seed=0)
    dense = _gen(pipe)
    dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "dense"))
    np.testing.assert_array_equal(dense, _gen(pipe))
    dit_sparse.remove(pipe)
    dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "skip"))
    assert np.abs(_gen(pipe) - dense).max() > 1e-4


def test_the_processor_sees_each_denoising_step_of_the_coordinate_model():
    """Dense warm-up steps and calibration need the step; the processor reads it from the forward's timestep."""
    pipe = build_pipeline(COORD, seed=0)
    processor = dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "dense"))
    steps = []
    processor.observers.append(lambda site, q, k, v, text: steps.append(site.step))
    _gen(pipe)
    assert sorted(set(steps)) == [0, 1]


def test_a_plan_with_dense_steps_refuses_a_forward_that_hides_the_timestep(monkeypatch):
    """Without a readable timestep a dense warm-up cannot be honoured: a clear error, not an all-sparse video. A
    subclass that passes its arguments on as *args/**kwargs does not hide it: they are read by Wan's signature."""
    import pytest

    from dit_sparse.adapters.wan import WanAdapter
    from dit_sparse.plan import Schedule
    from dit_sparse.processor import UnknownStepError

    class PassesOn(TinyShapesTransformer):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs)

    pipe = build_pipeline(COORD, seed=0)
    pipe.transformer = PassesOn.from_config(pipe.transformer.config)
    dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "skip", schedule=Schedule(dense_above=0.5)))
    _gen(pipe)
    dit_sparse.remove(pipe)
    monkeypatch.setattr(WanAdapter, "timestep", lambda self, inputs: None)  # a forward whose timestep none can read
    for schedule in (Schedule(dense_above=0.5), Schedule()):
        strategy = "skip" if schedule.uses_noise_levels else "reuse"  # reuse must tell steps apart too
        dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, strategy, schedule=schedule))
        with pytest.raises(UnknownStepError, match="gave no timestep"):
            _gen(pipe)
        dit_sparse.remove(pipe)
    # Dense steps counted in steps need no timestep here: the pipeline's cache context says where the loop is.
    dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "skip", schedule=Schedule(dense_first=0.5)))
    _gen(pipe)


def test_a_fresh_interpreter_loads_a_saved_coordinate_pipeline(tmp_path):
    """diffusers only loads classes from modules already imported; the pipeline's loader must import ours."""
    build_pipeline(COORD, seed=0).save_pretrained(tmp_path)
    code = ("from dit_sparse.zoo import load_tiny_shapes; "
            f"print(type(load_tiny_shapes(path={str(tmp_path)!r}).transformer).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "TinyShapesTransformer"
