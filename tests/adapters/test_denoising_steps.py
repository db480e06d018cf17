"""An all-dense plan equals the stock processors over a few denoising steps, for every family.

Each step feeds the previous step's output back (an Euler update), inside the pipeline's cache context, so step
tracking, the CFG-branch hook and the grid capture all run as they do in a pipeline.
"""

import contextlib

import pytest
import tiny_models as tm
import torch

import dit_sparse
from dit_sparse import SparsePlan

FAMILIES = [
    (tm.tiny_wan, tm.wan_inputs), (tm.tiny_cogvideox, tm.cogvideox_inputs),
    (tm.tiny_hunyuan_video, tm.hunyuan_video_inputs), (tm.tiny_ltx_video, tm.ltx_video_inputs),
    (tm.tiny_mochi, tm.mochi_inputs), (tm.tiny_flux, tm.flux_inputs), (tm.tiny_sd3, tm.sd3_inputs),
    (tm.tiny_pixart, tm.pixart_inputs),
]


def denoise(model, inputs, timesteps=(900, 600, 300)):
    x = dict(inputs)
    latents = x["hidden_states"]
    for step, t in enumerate(timesteps):
        x["hidden_states"] = latents
        x["timestep"] = torch.full_like(inputs["timestep"], t)
        # SD3 and PixArt have no cache context (their pipelines do not open one): steps come from timesteps there.
        context = (model.cache_context("cond", step_index=step, num_inference_steps=len(timesteps))
                   if hasattr(model, "cache_context") else contextlib.nullcontext())
        with torch.no_grad(), context:
            velocity = model(**x)[0]
        latents = latents - 0.3 * velocity.narrow(1, 0, latents.shape[1])
    return latents


@pytest.mark.parametrize("build,inputs", FAMILIES, ids=lambda f: getattr(f, "__name__", ""))
def test_dense_plan_equals_stock_over_denoising_steps(build, inputs):
    model, x = build(), inputs()
    stock = denoise(model, x)
    dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    assert float((denoise(model, x) - stock).abs().max()) <= 1e-6
    dit_sparse.remove(model)


@pytest.mark.parametrize("residual_connection", [False, True])
def test_a_module_that_adds_its_input_is_not_reused_whole(residual_connection):
    """PixArt's attention may add its own input to its output (`residual_connection`): its output then follows the
    current input, so the module runs at every step (reusing per head); without it, it runs at refreshes only."""
    model, x = tm.tiny_pixart(), tm.pixart_inputs()
    modules = [m for name, m in model.named_modules() if name.endswith("attn1")]
    calls = []
    for module in modules:
        module.residual_connection = residual_connection
        module.to_q.register_forward_hook(lambda *_: calls.append(1))
    plan = SparsePlan.uniform(model, "reuse").with_schedule(refresh_interval=3, dense_first=0.0)
    processor = dit_sparse.apply(model, plan)
    denoise(model, x)  # step 0 refreshes, steps 1 and 2 reuse
    assert len(calls) == len(modules) * (3 if residual_connection else 1)
    assert processor.stats.executed_density == pytest.approx(1 / 3)
    dit_sparse.remove(model)
