"""One schedule: every form of applying a plan runs the same steps dense, in every family's real pipeline.

For each supported family, its real diffusers pipeline class (tests/tiny_pipelines.py) generates with a plan applied
in three forms: `apply(pipe, plan)`, `apply(pipe.transformer, plan)` and the one-line form
(`transformer.set_attn_processor(SparseProcessor(plan))`, or `module.processor = ...` on every attention module for
Mochi, which has no set_attn_processor). The outputs must be equal bit for bit (fp32, CPU). A plan whose dense steps
are counted in steps needs the step count: `apply(pipe)` reads it from the scheduler, and pipelines that pass it to
the transformer (Wan, tiny-shapes) give it to `apply(transformer)`; elsewhere, and in the one-line form (which binds
during its first call and cannot see that call's step count), the forms must refuse with UnknownStepError before the
first step, never run another schedule. A plan in noise levels runs alike everywhere.

Each generation is a few steps on a 3x5x7 (video) or 5x7 (image) token grid; a pipeline is built once per family.
"""

from __future__ import annotations

import contextlib

import pytest
import tiny_models as tm
import tiny_pipelines as tp
import torch

import dit_sparse
from dit_sparse import SparsePlan, SparseProcessor, UnknownStepError
from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.processor import attention_modules

BLOCKS = (16, 16)
WINDOW = [0, 1, 1]
DENSE_STEPS = dict(dense_first=0.25, dense_last_steps=1)  # 5 steps: step 0 and step 4 dense
FAMILIES = list(tp.BUILDERS)
PLANS = ["steps", "noise", "reuse", "rescale", "dynamic"]
FORMS = ["transformer", "one_line"]
SHIPPED_PLAN = "dit_sparse/plans/tiny-shapes.plan.json"


def set_on_every_module(transformer, processor):
    """The one-line form for a transformer without set_attn_processor (Mochi)."""
    for module in attention_modules(transformer).values():
        module.processor = processor


def one_line(transformer, plan):
    processor = SparseProcessor(plan, block_size=BLOCKS)
    if hasattr(transformer, "set_attn_processor"):
        transformer.set_attn_processor(processor)
    else:
        set_on_every_module(transformer, processor)
    return processor


def install(form, pipe, plan):
    """Apply `plan` to `pipe` in one of the three forms; returns the processor."""
    if form == "pipe":
        return dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    if form == "transformer":
        return dit_sparse.apply(pipe.transformer, plan, block_size=BLOCKS)
    return one_line(pipe.transformer, plan)


def written(plan: SparsePlan) -> SparsePlan:
    """The plan as the project writes it: through its JSON file format."""
    return SparsePlan.from_json(plan.to_json())


class Case:
    """One family's pipeline, its stock output, its plans, and the output of `apply(pipe, plan)` per plan."""

    def __init__(self, name: str):
        self.name = name
        self.pipe, self.kwargs = tp.BUILDERS[name]()
        self.set_timesteps = tp.set_timesteps_kwargs(name, self.pipe, self.kwargs)
        self.stock = tp.generate(self.pipe, self.kwargs)
        self.stock_types = {n: type(p) for n, p in self.processors().items()}
        transformer = self.pipe.transformer

        def in_noise(plan):
            return written(dit_sparse.in_noise_units(plan.with_schedule(**DENSE_STEPS), self.pipe, tp.STEPS,
                                                     **self.set_timesteps))

        diagonal = SparsePlan.uniform(transformer, "diagonal", window=WINDOW)
        self.plans = {
            "all_sparse": diagonal,
            "steps": diagonal.with_schedule(**DENSE_STEPS),
            "noise": in_noise(diagonal),
            "reuse": in_noise(SparsePlan.uniform(transformer, "reuse").with_schedule(refresh_interval=2)),
            "rescale": in_noise(SparsePlan.uniform(transformer, "diagonal", window=WINDOW, rescale=True)
                                .with_schedule(refresh_interval=2)),
            "dynamic": in_noise(SparsePlan.uniform(transformer, "block_adaptive", tau=0.8)
                                .with_schedule(refresh_interval=2)),
        }
        if name == "tiny_shapes":
            self.plans["shipped"] = SparsePlan.load(SHIPPED_PLAN)
        self._applied: dict[str, tuple[torch.Tensor, float]] = {}

    def processors(self):
        return {n: m.processor for n, m in attention_modules(self.pipe.transformer).items()}

    def run(self, form: str, plan_name: str) -> tuple[torch.Tensor, float]:
        """Generate with the plan applied in `form`; remove it after, whatever happens."""
        processor = install(form, self.pipe, self.plans[plan_name])
        try:
            out = tp.generate(self.pipe, self.kwargs)
        finally:
            dit_sparse.remove(self.pipe)
        assert {n: type(p) for n, p in self.processors().items()} == self.stock_types
        return out, processor.stats.executed_density

    def applied(self, plan_name: str) -> tuple[torch.Tensor, float]:
        """`apply(pipe, plan)`'s output and executed density (computed once)."""
        if plan_name not in self._applied:
            self._applied[plan_name] = self.run("pipe", plan_name)
        return self._applied[plan_name]


_CASES: dict[str, Case] = {}


def _case(name: str) -> Case:
    """Each family's pipeline is built once for the module (remove puts it back as it was)."""
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on tensors this small, a second thread costs more in synchronisation than it saves, and
    ten times more on a busy machine. Every comparison here runs both sides at the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _CASES.clear()


@pytest.fixture(scope="module", params=FAMILIES)
def case(request) -> Case:
    return _case(request.param)


def _cannot_see_the_step_count(case: Case, plan_name: str, form: str) -> bool:
    """Whether this form must refuse this plan: it counts steps, and nothing gives the form the step count."""
    return case.plans[plan_name].schedule.counts_steps and (form == "one_line"
                                                            or case.name not in tp.PASSES_STEP_COUNT)


# -- the scheduler and the transformer agree on every step's noise level ----------------------------------------------
def test_noise_levels_match_what_the_pipeline_passes(case):
    """in_noise_units reads the scheduler; the processor reads the timestep the pipeline passes (Flux t / 1000,
    Mochi's rising timesteps): both must give the same noise level at every step, and the plan in noise levels
    must run dense exactly the steps the plan counted in steps does."""
    adapter = adapter_for_transformer(case.pipe.transformer)
    calls = tp.transformer_calls(case.pipe, case.kwargs)
    seen = []
    for timestep, _name, _index, _total in calls:
        level = adapter.noise_level(timestep)
        if not seen or abs(seen[-1] - level) > 1e-6:
            seen.append(level)
    levels = dit_sparse.noise_levels(case.pipe, tp.STEPS, **case.set_timesteps)
    assert len(seen) == tp.STEPS
    assert seen == pytest.approx(levels, abs=1e-6)
    schedule = case.plans["noise"].schedule
    assert [schedule.dense_at_noise(v) for v in seen] == [True, False, False, False, True]
    if case.name in tp.PASSES_STEP_COUNT:
        assert [(i, n) for _, _, i, n in calls] == [(i, tp.STEPS) for i in range(tp.STEPS) for _ in range(2)]
    else:
        assert {(i, n) for _, _, i, n in calls} == {(None, None)}


# -- apply(pipe): the reference ---------------------------------------------------------------------------------------
def test_apply_pipe_runs_the_dense_steps(case):
    """apply(pipe) with dense steps counted in steps equals the same plan in noise levels bit for bit, and both
    differ from the all-sparse plan (dense steps are not ignored) and from the stock output (sparse steps run)."""
    steps, steps_density = case.applied("steps")
    noise, noise_density = case.applied("noise")
    sparse, sparse_density = case.applied("all_sparse")
    assert torch.isfinite(noise).all()
    assert torch.equal(steps, noise) and steps_density == noise_density
    assert not torch.equal(noise, sparse) and not torch.equal(noise, case.stock)
    # 2 of 5 steps dense, 3 at the diagonal layout's density (CFG branches that share an output compute nothing).
    assert 0 < sparse_density < noise_density < 1


@pytest.mark.parametrize("plan_name", PLANS[2:])
def test_apply_pipe_with_plans_that_keep_state(case, plan_name):
    out, density = case.applied(plan_name)
    assert torch.isfinite(out).all() and not torch.equal(out, case.stock)
    assert density > 0  # a re-scaled refresh runs dense and sparse attention: above 1 there


# -- the other forms give apply(pipe)'s output, or refuse ------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("plan_name", PLANS)
def test_every_form_equals_apply_pipe(case, plan_name, form):
    if _cannot_see_the_step_count(case, plan_name, form):
        with pytest.raises(UnknownStepError) as err:
            case.run(form, plan_name)
        message = str(err.value)
        assert "apply(pipe" in message and "in_noise_units" in message
        return
    reference, reference_density = case.applied(plan_name)
    out, density = case.run(form, plan_name)
    assert torch.equal(out, reference), f"max abs diff {float((out - reference).abs().max()):.3g}"
    assert density == reference_density


@pytest.mark.parametrize("form", ["pipe", *FORMS])
def test_a_second_generation_starts_afresh(case, form):
    """Two generations in a row under one applied plan: the second is a new generation (its noise level rises back:
    Flux's t / 1000 and Mochi's rising timesteps included), so it equals the first bit for bit, as it would with the
    plan freshly applied; nothing of the first one's caches (reuse, re-scale statistics, layouts) carries over."""
    reference, _ = case.applied("reuse")
    install(form, case.pipe, case.plans["reuse"])
    try:
        first, second = tp.generate(case.pipe, case.kwargs), tp.generate(case.pipe, case.kwargs)
    finally:
        dit_sparse.remove(case.pipe)
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_refusal_comes_before_the_first_step(case):
    """A form that cannot follow a plan counted in steps refuses before any attention runs."""
    for form in [form for form in FORMS if _cannot_see_the_step_count(case, "steps", form)]:
        processor = install(form, case.pipe, case.plans["steps"])
        try:
            with pytest.raises(UnknownStepError):
                tp.generate(case.pipe, case.kwargs)
            assert processor.stats.calls == 0
        finally:
            dit_sparse.remove(case.pipe)


def test_shipped_plan_in_every_form():
    """The plan the project ships (tiny-shapes, dense steps in noise levels) runs alike in every form."""
    case = _case("tiny_shapes")
    reference, density = case.applied("shipped")
    assert not torch.equal(reference, case.stock) and density < 1
    for form in FORMS:
        out, form_density = case.run(form, "shipped")
        assert torch.equal(out, reference) and form_density == density


# -- by hand: the transformer driven in a loop the way its pipeline drives it ------------------------------------------
def _by_hand_inputs(name):
    """(forward kwargs without timestep, CFG branches as separate calls?) for each family's by-hand loop."""
    if name == "wan":
        return tm.wan_inputs(batch=1), True
    if name == "tiny_shapes":
        g = torch.Generator().manual_seed(1)
        return dict(hidden_states=torch.randn(1, 3, 3, 10, 14, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, 64, generator=g), return_dict=False), True
    if name == "hunyuan_video":
        return tm.hunyuan_video_inputs(batch=1, padded=False), True
    if name == "flux":
        return tm.flux_inputs(batch=1), True
    inputs = {"cogvideox": tm.cogvideox_inputs, "ltx_video": tm.ltx_video_inputs, "mochi": tm.mochi_inputs,
              "sd3": tm.sd3_inputs, "pixart": tm.pixart_inputs}[name]
    return inputs(batch=2), False


def by_hand(case: Case) -> torch.Tensor:
    """Each step: the scheduler's timestep as the pipeline passes it (Flux t / 1000; Mochi's scheduler rises), in the
    pipeline's cache context ("cond"/"uncond" calls with the step count for Wan and tiny-shapes, "cond"/"uncond"
    for HunyuanVideo and Flux, one "cond_uncond" batch for CogVideoX, LTX and Mochi, none for SD3 and PixArt)."""
    import copy

    name, transformer = case.name, case.pipe.transformer
    scheduler = copy.deepcopy(case.pipe.scheduler)
    scheduler.set_timesteps(tp.STEPS, **case.set_timesteps)
    x, separate_branches = _by_hand_inputs(name)
    x.pop("timestep", None)
    latents = x["hidden_states"]
    has_context = name not in ("sd3", "pixart")
    for i, t in enumerate(scheduler.timesteps):
        passed = (t / 1000 if name == "flux" else t).expand(latents.shape[0])
        x["hidden_states"] = latents
        outs = []
        for branch in (("cond", "uncond") if separate_branches else ("cond_uncond",)):
            where = dict(step_index=i, num_inference_steps=tp.STEPS) if name in tp.PASSES_STEP_COUNT else {}
            context = transformer.cache_context(branch, **where) if has_context else contextlib.nullcontext()
            with torch.no_grad(), context:
                outs.append(transformer(**x, timestep=passed)[0])
        velocity = outs[0] if len(outs) == 1 else outs[1] + 2.0 * (outs[0] - outs[1])
        latents = latents - 0.2 * velocity.narrow(-1 if name in ("ltx_video", "flux") else 1, 0,
                                                  latents.shape[-1 if name in ("ltx_video", "flux") else 1])
    return latents


def test_by_hand_apply_transformer_equals_one_line_form(case):
    """The transformer driven by hand as its pipeline drives it: apply(transformer) and the one-line form agree bit
    for bit (a plan in noise levels, one that keeps state across steps), and the plan's dense steps are dense; a plan
    counted in steps runs under apply(transformer) where the cache context carries the step count, and the one-line
    form refuses it."""
    transformer = case.pipe.transformer
    stock = by_hand(case)
    results = {}
    plan_names = ("all_sparse", "noise", "reuse")
    for plan_name in plan_names:
        for form in FORMS:
            processor = install(form, case.pipe, case.plans[plan_name])
            try:
                results[plan_name, form] = by_hand(case), processor.stats.executed_density
            finally:
                dit_sparse.remove(transformer)
    for plan_name in plan_names:
        (a, da), (b, db) = results[plan_name, "transformer"], results[plan_name, "one_line"]
        assert torch.equal(a, b) and da == db
    noise, sparse = results["noise", "transformer"][0], results["all_sparse", "transformer"][0]
    assert not torch.equal(noise, sparse) and not torch.equal(noise, stock)
    for form in FORMS:
        install(form, case.pipe, case.plans["steps"])
        try:
            if _cannot_see_the_step_count(case, "steps", form):
                with pytest.raises(UnknownStepError):
                    by_hand(case)
            else:  # the step count from the cache context: the same steps dense as in noise levels
                assert torch.equal(by_hand(case), noise)
        finally:
            dit_sparse.remove(transformer)
    assert torch.equal(by_hand(case), stock)


# -- remove ------------------------------------------------------------------------------------------------------
def test_remove_restores_the_stock_output(case):
    """After every form above (and one more one-line form here), the pipeline generates its stock output."""
    case.run("one_line", "noise")
    assert {n: type(p) for n, p in case.processors().items()} == case.stock_types
    assert torch.equal(tp.generate(case.pipe, case.kwargs), case.stock)
