"""The plans the project ships run the computation they were measured with, in every form of applying them.

They were measured through `apply(pipe)` with dense steps counted in steps (version 1). Shipped now in noise levels
(version 2), they must run exactly the same steps dense at the step count they were measured at, and the one-line
form and `apply(transformer)` must make the same video as `apply(pipe)`.
"""

from pathlib import Path

import pytest
import torch

import dit_sparse
from dit_sparse import Schedule, SparsePlan, SparseProcessor, UnknownStepError
from dit_sparse.zoo import load_tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right on a dark background"
SHIPPED = [ROOT / "dit_sparse" / "plans" / "tiny-shapes.plan.json",
           ROOT / "benchmarks" / "results" / "plans" / "tiny-shapes-reuse-schedule.plan.json"]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_tiny_shapes()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(pipe, steps: int) -> torch.Tensor:
    return torch.as_tensor(pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                                output_type="np").frames)


def _as_measured(plan: SparsePlan) -> SparsePlan:
    """The version-1 plan this file was converted from (its schedule counted in steps)."""
    converted = plan.calibration["schedule_in_noise_units"]
    steps = Schedule.from_json(converted["from"], version=1)
    return SparsePlan(plan.model, plan.modules, plan.default, steps, plan.calibration), converted["steps"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_plan_runs_what_it_was_measured_with_in_every_form(pipe, path):
    plan = SparsePlan.load(path)
    measured, steps = _as_measured(plan)
    assert plan.schedule.uses_noise_levels and measured.schedule.counts_steps
    dit_sparse.apply(pipe, measured)
    reference = _video(pipe, steps)  # what the benches measured
    dit_sparse.remove(pipe)
    videos = {}
    dit_sparse.apply(pipe, plan)
    videos["apply(pipe)"] = _video(pipe, steps)
    dit_sparse.remove(pipe)
    dit_sparse.apply(pipe.transformer, plan)
    videos["apply(transformer)"] = _video(pipe, steps)
    dit_sparse.remove(pipe)
    pipe.transformer.set_attn_processor(SparseProcessor(plan))
    videos["one-line"] = _video(pipe, steps)
    dit_sparse.remove(pipe)
    for form, video in videos.items():
        assert torch.equal(video, reference), form


def test_a_plan_counted_in_steps_refuses_where_nothing_tells_the_step_count(pipe):
    """Driven by hand without the pipeline's cache context, the transformer cannot know which steps are last."""
    plan = SparsePlan.uniform(pipe.transformer, "skip").with_schedule(dense_last_steps=2)
    dit_sparse.apply(pipe.transformer, plan)
    x = torch.randn(1, 3, 8, 32, 32)
    text = torch.randn(1, 6, pipe.transformer.config.text_dim)
    with pytest.raises(UnknownStepError, match=r"apply\(pipe, plan\).*in_noise_units"):
        pipe.transformer(hidden_states=x, timestep=torch.tensor([999.0]), encoder_hidden_states=text)
    dit_sparse.remove(pipe)
    noise_plan = dit_sparse.in_noise_units(plan, pipe, 20)
    dit_sparse.apply(pipe.transformer, noise_plan)
    with torch.no_grad():
        pipe.transformer(hidden_states=x, timestep=torch.tensor([999.0]), encoder_hidden_states=text)
    dit_sparse.remove(pipe)


def test_the_summary_says_which_steps_run_dense(pipe):
    plan = SparsePlan.load(SHIPPED[1])
    dit_sparse.apply(pipe, plan)
    assert "20-step grid it was measured on: steps 0-3, 18, 19" in dit_sparse.summary(pipe)
    dit_sparse.remove(pipe)
