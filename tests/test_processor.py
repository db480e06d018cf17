"""SparseProcessor inside real diffusers transformers and pipelines (tiny, random weights)."""

import copy

import pytest
import torch
from tiny_models import (
    cogvideox_inputs,
    tiny_cogvideox,
    tiny_cogvideox_pipeline,
    tiny_wan,
    tiny_wan_pipeline,
    wan_inputs,
)

import dit_sparse
from dit_sparse import AlreadyAppliedError, PlanMismatchError, SparsePlan, SparseProcessor, UnsupportedModelError
from dit_sparse.attend import AttentionSite, attend
from dit_sparse.executors import get_executor
from dit_sparse.layout import Grid
from dit_sparse.plan import HeadStrategy
from dit_sparse.state import GenerationState

BLOCKS = (16, 16)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("build,inputs", [(tiny_wan, wan_inputs), (tiny_cogvideox, cogvideox_inputs)])
def test_dense_plan_equals_stock_and_remove_restores(build, inputs):
    model, x = build(), inputs()
    originals = dict(model.attn_processors)
    stock = run(model, x)
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    assert (run(model, x) - stock).abs().max() <= 1e-6
    assert processor.stats.calls == 2
    dit_sparse.remove(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(run(model, x), stock)


@pytest.mark.parametrize("build,inputs", [(tiny_wan, wan_inputs), (tiny_cogvideox, cogvideox_inputs)])
def test_one_line_form_equals_apply(build, inputs):
    model, x = build(), inputs()
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    applied = run(model, x)
    dit_sparse.remove(model)
    model.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
    assert torch.equal(run(model, x), applied)
    assert "diagonal" in dit_sparse.summary(model)
    dit_sparse.remove(model)
    assert not any(isinstance(p, SparseProcessor) for p in model.attn_processors.values())


def test_the_one_line_form_binds_at_its_first_call_which_runs_twice_and_stops_watching():
    """The one-line form binds at its first call (dit_sparse/call_watch.py), found on the stack of running module calls
    that torch's global module hooks keep while the processor waits: that call runs the transformer twice, the second
    time bound, and returns the second output; every later call runs once. Bound, the processor is watched no more."""
    from dit_sparse.call_watch import WATCH

    model, x = tiny_wan(), wan_inputs()
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    applied = [run(model, x), run(model, x)]
    dit_sparse.remove(model)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    processor = SparseProcessor(plan, block_size=BLOCKS)
    assert WATCH.waiting(processor) and WATCH.active
    model.set_attn_processor(processor)
    assert torch.equal(run(model, x), applied[0]) and len(calls) == 2
    assert not WATCH.waiting(processor)
    assert torch.equal(run(model, x), applied[1]) and len(calls) == 3
    dit_sparse.remove(model)


def test_a_one_line_form_that_failed_its_check_is_removed_and_apply_refuses_over_a_one_line_form():
    model, x = tiny_wan(), wan_inputs()
    stock = run(model, x)
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    wrong = SparsePlan.from_json({**plan.to_json(), "model": {**plan.to_json()["model"], "num_layers": 30}})
    model.set_attn_processor(SparseProcessor(wrong, block_size=BLOCKS))
    with pytest.raises(PlanMismatchError):
        run(model, x)
    assert "not usable" in dit_sparse.summary(model) and "remove" in dit_sparse.summary(model)
    dit_sparse.remove(model)
    assert not any(isinstance(p, SparseProcessor) for p in model.attn_processors.values())
    assert torch.equal(run(model, x), stock)
    # A working one-line form: apply on top of it is refused (remove first), not half-applied.
    model.set_attn_processor(SparseProcessor(plan, block_size=BLOCKS))
    run(model, x)
    with pytest.raises(AlreadyAppliedError, match="remove"):
        dit_sparse.apply(model, plan)
    dit_sparse.remove(model)
    assert torch.equal(run(model, x), stock)


@pytest.mark.parametrize("block_size", [(16,), (-16, 16), ("64", 64), (0, 16), 64])
def test_a_bad_block_size_is_refused_when_applied_not_at_the_first_forward(block_size):
    model = tiny_wan()
    with pytest.raises(ValueError, match="block_size must be"):
        dit_sparse.apply(model, SparsePlan.uniform(model, "dense"), block_size=block_size)
    assert not any(isinstance(p, SparseProcessor) for p in model.attn_processors.values())


def test_sparse_plan_changes_output_by_a_measured_amount_and_counts_work():
    model, x = tiny_wan(), wan_inputs(frames=3, height=10, width=14)
    stock = run(model, x)
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]), block_size=BLOCKS)
    out = run(model, x)
    rel = float((out - stock).norm() / stock.norm())
    assert 0 < rel < 1
    grid = Grid(3, 5, 7)
    layout = dit_sparse.strategies.get_strategy("diagonal").layout({"window": (0, 1, 1)},
                                                                   dit_sparse.strategies.BuildContext(grid, *BLOCKS))
    assert processor.stats.executed_density == pytest.approx(layout.density())
    assert processor.stats.executed_density < 1


def test_unsupported_transformer_lists_supported_and_leaves_model_unchanged():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    before = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    assert before
    plan = SparsePlan.uniform(tiny_wan(), "dense")
    with pytest.raises(UnsupportedModelError, match="supported transformers: .*WanTransformer3DModel"):
        dit_sparse.apply(model, plan)
    assert all(dict(model.named_modules())[k].processor is v for k, v in before.items())


def test_plan_for_another_model_names_both():
    plan = SparsePlan.uniform(tiny_wan(), "dense")
    from diffusers import WanTransformer3DModel

    other = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=3)
    before = dict(other.attn_processors)
    with pytest.raises(PlanMismatchError) as err:
        dit_sparse.apply(other, plan)
    message = str(err.value)
    assert "num_layers: plan has 2, model has 3" in message and "num_heads: plan has 2, model has 4" in message
    assert all(other.attn_processors[k] is v for k, v in before.items())


def test_applying_twice_is_refused():
    model = tiny_wan()
    plan = SparsePlan.uniform(model, "dense")
    dit_sparse.apply(model, plan)
    with pytest.raises(AlreadyAppliedError, match="remove"):
        dit_sparse.apply(model, plan)


def test_nan_input_behaves_like_dense_attention():
    model, x = tiny_wan(), wan_inputs()
    x["hidden_states"][0, 0, 0, 0, 0] = float("nan")
    stock = run(model, x)
    dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]), block_size=BLOCKS)
    out = run(model, x)
    assert torch.isnan(stock).any() and torch.isnan(out).any()  # propagated, not masked away


def test_batch_dtypes_and_changing_resolution():
    model = tiny_wan()
    plan = SparsePlan.uniform(model, "block_adaptive", tau=0.8)
    dit_sparse.apply(model, plan, block_size=BLOCKS)
    for frames, height, width in [(3, 10, 14), (2, 12, 8), (4, 6, 10)]:
        out = run(model, wan_inputs(batch=2, frames=frames, height=height, width=width))
        assert out.shape == (2, 4, frames, height, width) and torch.isfinite(out).all()
    ref = run(model, wan_inputs(batch=2))
    for dtype in (torch.bfloat16, torch.float16):
        low = model.to(dtype)
        x = wan_inputs(batch=2)
        x["hidden_states"] = x["hidden_states"].to(dtype)
        x["encoder_hidden_states"] = x["encoder_hidden_states"].to(dtype)
        out = run(low, x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert float((out.float() - ref).norm() / ref.norm()) < 0.1
    model.to(torch.float32)


def _site(spec, grid, step, cache, executor="cpu"):
    return AttentionSite("blocks.0.attn1", (spec, spec), grid, step, False, 3, "cond", get_executor(executor),
                         16, 16, cache, {})


def test_rescale_refresh_is_exact_dense_and_reuses_its_statistics():
    grid = Grid(3, 5, 7)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 2, 16, generator=g) for _ in range(3))
    spec = HeadStrategy.make("diagonal", window=[0, 1, 1], rescale=True)
    plain = HeadStrategy.make("diagonal", window=[0, 1, 1])
    cache = GenerationState()
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    refreshed = attend(q, k, v, _site(spec, grid, 0, cache))
    assert (refreshed - dense).abs().max() < 1e-5
    # Same inputs one step later: the cached share and residual reproduce dense attention exactly.
    assert (attend(q, k, v, _site(spec, grid, 1, cache)) - dense).abs().max() < 1e-5
    # New inputs: re-scaled sparse differs from plain sparse, and from its own refresh.
    q2 = q + 0.3 * torch.randn(q.shape, generator=g)
    rescaled = attend(q2, k, v, _site(spec, grid, 2, cache))
    sparse = attend(q2, k, v, _site(plain, grid, 2, {}))
    dense2 = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q2, k, v))).transpose(1, 2)
    assert (rescaled - sparse).abs().max() > 1e-3
    assert (rescaled - dense2).norm() < (sparse - dense2).norm()
    # Past the refresh interval it refreshes to dense again.
    assert (attend(q2, k, v, _site(spec, grid, 3, cache)) - dense2).abs().max() < 1e-5
    # The reference executor gives the same numbers.
    assert (attend(q2, k, v, _site(spec, grid, 4, copy.deepcopy(cache), "reference")) -
            attend(q2, k, v, _site(spec, grid, 4, copy.deepcopy(cache), "cpu"))).abs().max() < 1e-5


def test_reuse_runs_dense_at_refreshes_and_reuses_that_output_between():
    grid = Grid(3, 5, 7)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 2, 16, generator=g) for _ in range(3))
    q2 = q + 0.3 * torch.randn(q.shape, generator=g)
    reuse, diagonal = HeadStrategy.make("reuse"), HeadStrategy.make("diagonal", window=[0, 1, 1])

    def sdpa(q_):
        sdpa_ = torch.nn.functional.scaled_dot_product_attention
        return sdpa_(*(x.transpose(1, 2) for x in (q_, k, v))).transpose(1, 2)

    def site(step, cache, heads=(reuse, reuse)):
        return AttentionSite("blocks.0.attn1", heads, grid, step, False, 3, "cond", get_executor("cpu"), 16, 16,
                             cache, {})

    cache = GenerationState()
    refreshed = attend(q, k, v, site(0, cache))
    assert (refreshed - sdpa(q)).abs().max() < 1e-5
    for step in (1, 2):  # nothing runs: the output of step 0, bit for bit, whatever the inputs now
        between = site(step, cache)
        assert torch.equal(attend(q2, k, v, between), refreshed)
        assert between.stats.computed_pairs == 0 and between.stats.dense_pairs > 0
    assert (attend(q2, k, v, site(3, cache)) - sdpa(q2)).abs().max() < 1e-5  # the refresh interval is over
    # Mixed heads: only the reuse head keeps its old output; the other runs its layout at this step.
    cache = GenerationState()
    attend(q, k, v, site(0, cache, (reuse, diagonal)))
    mixed = attend(q2, k, v, site(1, cache, (reuse, diagonal)))
    assert torch.equal(mixed[:, :, 0], refreshed[:, :, 0])
    assert torch.equal(mixed[:, :, 1], attend(q2, k, v, site(1, {}, (diagonal, diagonal)))[:, :, 1])


@pytest.mark.parametrize("order", [1, 2])
def test_reuse_forecasts_between_refreshes_from_the_last_computed_outputs(order):
    """Steps 0 and 1 run dense (points to forecast from), step 2 refreshes, steps 3 and 4 forecast: the line
    through the last two outputs, plus with order 2 TaylorSeer's second-order term."""
    grid = Grid(2, 3, 5)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, grid.num_tokens, 2, 8, generator=g) for _ in range(2))
    qs = [torch.randn(1, grid.num_tokens, 2, 8, generator=g) for _ in range(3)]
    spec = HeadStrategy.make("reuse", order=order)
    cache = GenerationState()

    def site(step):
        return AttentionSite("blocks.0.attn1", (spec, spec), grid, step, step < 2, 3, "cond", get_executor("cpu"),
                             16, 16, cache, {})

    y0, y1, y2 = (attend(q, k, v, site(step)) for step, q in enumerate(qs))
    for step in (3, 4):
        h = step - 2
        expected = y2 + (y2 - y1) * h
        if order == 2:
            expected = expected + ((y2 - y1) - (y1 - y0)) / 2 * h * h
        assert torch.allclose(attend(qs[0], k, v, site(step)), expected, atol=1e-6)


def test_taylor_forecast_is_exact_on_lines_and_damps_the_curvature_of_newtons_polynomial():
    from dit_sparse.attend import taylor_forecast

    line = [(s, torch.tensor([2.0 * s + 1])) for s in (0, 3, 5)]
    for points in (line, line[1:]):
        assert float(taylor_forecast(points, 7)) == pytest.approx(15.0)
    square = [(s, torch.tensor([float(s * s)])) for s in (0, 3, 6)]
    # slope 9 between the last two, curvature (9 - 3) / 6 = 1: 36 + 9 * 2 + 1 * 2^2 (Newton would give 8^2 = 64)
    assert float(taylor_forecast(square, 8)) == pytest.approx(58.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taylor_forecast_weighted_sum_matches_the_divided_differences_on_uneven_steps(dtype):
    from dit_sparse.attend import taylor_forecast

    g = torch.Generator().manual_seed(0)
    points = [(s, torch.randn(2, 7, 5, generator=g).to(dtype)) for s in (1, 4, 6)]
    kept = [y.clone() for _, y in points]
    (s0, y0), (s1, y1), (s2, y2) = [(s, y.double()) for s, y in points]
    slope = (y2 - y1) / (s2 - s1)
    curvature = (slope - (y1 - y0) / (s1 - s0)) / (s2 - s0)
    for step in (7, 9):
        h = step - s2
        second, first = taylor_forecast(points, step), taylor_forecast(points[1:], step)
        assert second.dtype == first.dtype == torch.float32  # summed in float32 whatever the outputs' dtype
        assert torch.allclose(second.double(), y2 + slope * h + curvature * h * h, atol=1e-5)
        assert torch.allclose(first.double(), y2 + slope * h, atol=1e-5)
    assert all(torch.equal(y, before) for (_, y), before in zip(points, kept))  # the kept outputs stay as they were


def _pipe_call(pipe, steps=4, **kw):
    g = torch.Generator().manual_seed(0)
    text = pipe.transformer.config.get("max_text_seq_length", 5) if hasattr(pipe.transformer.config, "get") else 5
    emb = torch.randn(1, text, 24, generator=g)
    neg = torch.randn(1, text, 24, generator=g)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=4.0,
                output_type="pt", generator=torch.Generator().manual_seed(1), **kw).frames


@pytest.mark.parametrize("build,size", [(tiny_wan_pipeline, dict(height=64, width=80, num_frames=5)),
                                        (tiny_cogvideox_pipeline, dict(height=40, width=56, num_frames=9))])
def test_sparse_plan_in_a_pipeline_end_to_end(build, size):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    dense = _pipe_call(pipe, **size)
    processor = dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "diagonal", window=[0, 1, 1]).with_schedule(
        dense_first=0.25), block_size=BLOCKS)
    sparse = _pipe_call(pipe, **size)
    err = float((sparse - dense).abs().max())
    print(f"{type(pipe).__name__}: executed attention {processor.stats.executed_density:.1%}, max abs diff {err:.4f}")
    assert 0 < err and torch.isfinite(sparse).all()
    # dense first 25% of 4 steps = step 0 dense; the rest at the diagonal layout's density.
    assert 0.0 < processor.stats.executed_density < 1.0
    dit_sparse.remove(pipe)
    assert torch.equal(_pipe_call(pipe, **size), dense)


def test_dense_first_steps_come_from_the_pipeline_not_call_counts():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.uniform(pipe.transformer, "diagonal", window=[0, 1, 1]).with_schedule(dense_first=0.5)
    processor = dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    seen = []
    original = processor._dense_now

    def spy(state, layer):
        result = original(state, layer)
        seen.append((state.position.step, state.branch, result))
        return result

    processor._dense_now = spy
    _pipe_call(pipe, steps=4, height=64, width=80, num_frames=5)
    steps = sorted({(s, b, d) for s, b, d in seen})
    assert steps == [(0, "cond", True), (0, "uncond", True), (1, "cond", True), (1, "uncond", True),
                     (2, "cond", False), (2, "uncond", False), (3, "cond", False), (3, "uncond", False)]


@pytest.mark.parametrize("first_steps", [4, 2])
@pytest.mark.parametrize("strategy", [dict(strategy="diagonal", window=[0, 1, 1], rescale=True),
                                      dict(strategy="reuse")])
def test_cached_statistics_do_not_carry_over_to_the_next_generation(first_steps, strategy):
    """A re-scaled (or reuse) plan whose only refresh is its first sparse step (4 steps, refresh every 5): the
    second generation must refresh again, not reuse the first one's residual (or output), whatever the first one's
    length."""
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=80, num_frames=5)
    plan = SparsePlan.uniform(pipe.transformer, **strategy).with_schedule(dense_first=0.25)

    def generate(seed, steps=4):
        g = torch.Generator().manual_seed(seed)
        emb, neg = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=4.0,
                    output_type="pt", generator=torch.Generator().manual_seed(seed), **size).frames

    dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    generate(7, first_steps)
    second = generate(8)
    dit_sparse.remove(pipe)
    dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    alone = generate(8)
    dit_sparse.remove(pipe)
    assert torch.equal(second, alone)


def test_dynamic_layout_cache_is_keyed_by_branch_and_refreshed():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = SparsePlan.uniform(pipe.transformer, "block_adaptive", tau=0.7).with_schedule(refresh_interval=2)
    processor = dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    _pipe_call(pipe, steps=3, height=64, width=80, num_frames=5)
    state = next(iter(processor._states.values())).generation
    branches = {key.branch for key in state.layouts}
    assert branches == {"cond", "uncond"}
    # Estimated at step 0, refreshed at step 2, except where the uncond call of step 2 took the cond call's output
    # (the first block's attn1 sees the same input in both branches).
    alike = {module for module, share in state.branches.items() if share.alike}
    assert alike == {"blocks.0.attn1"}
    layouts = [entry for key, entry in state.layouts.items()
               if not (key.module in alike and key.branch == "uncond")]
    assert {entry.step for entry in layouts} == {2}


@pytest.mark.parametrize("build,size", [(tiny_wan_pipeline, dict(height=64, width=80, num_frames=5)),
                                        (tiny_cogvideox_pipeline, dict(height=40, width=56, num_frames=9))])
def test_reuse_in_a_pipeline_computes_at_refresh_steps_only(build, size):
    """4 steps, refresh every 2: steps 0 and 2 run dense, 1 and 3 reuse. Refreshing every step is dense. On Wan the
    first block's attn1 sees the same input in both CFG branches: from step 1 on, its uncond call takes the cond
    call's output, so of 2 computed steps x 2 branches x 2 layers one call less runs."""
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    dense = _pipe_call(pipe, **size)
    plan = SparsePlan.uniform(pipe.transformer, "reuse").with_schedule(refresh_interval=2)
    processor = dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    reused = _pipe_call(pipe, **size)
    video_only = build is tiny_wan_pipeline  # CogVideoX's text rows and columns are always attended
    assert processor.stats.executed_density == pytest.approx(7 / 16) if video_only else \
        0.5 < processor.stats.executed_density < 1.0
    assert torch.isfinite(reused).all() and float((reused - dense).abs().max()) > 0
    dit_sparse.remove(pipe)
    dit_sparse.apply(pipe, plan.with_schedule(refresh_interval=1), block_size=BLOCKS)
    assert float((_pipe_call(pipe, **size) - dense).abs().max()) < 1e-4
    dit_sparse.remove(pipe)


@pytest.mark.parametrize("extrapolate", [True, False])
def test_a_module_whose_heads_all_reuse_skips_its_projections_between_refreshes(monkeypatch, extrapolate):
    """Wan's video-only attn1 with every head `reuse`: between refreshes the module's kept output (after its output
    projection) is returned and none of its projections run; that equals reusing the attention output per head,
    since what lies around attention is affine."""
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=80, num_frames=5)
    plan = SparsePlan.uniform(pipe.transformer, "reuse", extrapolate=extrapolate).with_schedule(
        refresh_interval=2, dense_first=0.25)
    calls = {"attn1": 0, "attn2": 0}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_q")):
            kind = name.split(".")[-2]
            module.register_forward_hook(lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
    processor = dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    whole = _pipe_call(pipe, **size)
    layers = len(pipe.transformer.blocks)
    # 4 steps x 2 CFG branches: step 0 dense, steps 1 and 3 refresh, step 2 reuses; at steps 1 and 3 the first
    # block's uncond call takes the cond call's output (the same input).
    assert calls == {"attn1": 3 * 2 * layers - 2, "attn2": 4 * 2 * layers}
    assert processor.stats.executed_density == pytest.approx((3 * 2 * layers - 2) / (4 * 2 * layers))
    state = next(iter(processor._states.values())).generation
    assert {key.heads for key in state.reuse} == {"module"}  # nothing kept per head
    dit_sparse.remove(pipe)
    monkeypatch.setattr(dit_sparse.site_builder, "whole_module_reuse", lambda heads: None)
    dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    per_head = _pipe_call(pipe, **size)
    dit_sparse.remove(pipe)
    assert torch.allclose(whole, per_head, atol=1e-5)
    dense = _pipe_call(pipe, **size)
    assert float((whole - dense).abs().max()) > 1e-3  # the reused step made a difference


def test_joint_text_modules_reuse_per_head_and_run_their_projections():
    """CogVideoX's text rows are attended afresh at every step, so its modules run even when every head reuses."""
    pipe = tiny_cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=40, width=56, num_frames=9)
    calls = []
    for name, module in pipe.transformer.named_modules():
        if name.endswith("attn1.to_q"):
            module.register_forward_hook(lambda *_: calls.append(1))
    _pipe_call(pipe, **size)
    dense_calls, calls[:] = len(calls), []
    processor = dit_sparse.apply(pipe, SparsePlan.uniform(pipe.transformer, "reuse").with_schedule(refresh_interval=2),
                                 block_size=BLOCKS)
    _pipe_call(pipe, **size)
    assert len(calls) == dense_calls > 0
    state = next(iter(processor._states.values())).generation
    kept = {key.heads for key in state.reuse}
    assert kept and "module" not in kept
    dit_sparse.remove(pipe)


def test_cfg_branches_with_the_same_input_share_the_output_exactly(monkeypatch):
    """Wan's first attn1 sees no text, so both CFG branches give it the same input: from the second step on its
    uncond call returns the cond call's output, bit for bit what it would have computed. The second block's input
    differs between branches (text entered through attn2): it runs every call and keeps no copy."""
    import dit_sparse.processor as processor_module

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=80, num_frames=5)
    calls = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith("attn1.to_q"):
            module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    plan = SparsePlan.uniform(pipe.transformer, "dense")
    processor = dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    shared = _pipe_call(pipe, **size)
    assert calls == {"blocks.0.attn1.to_q": 4 * 2 - 3, "blocks.1.attn1.to_q": 4 * 2}
    state = next(iter(processor._states.values())).generation
    first, second = (state.branches[f"blocks.{i}.attn1"] for i in (0, 1))
    assert first.alike and not first.differs and first.first.input is not None
    assert second.differs and second.first is None
    dit_sparse.remove(pipe)
    monkeypatch.setattr(processor_module, "shared_output", lambda *args: None)
    dit_sparse.apply(pipe, plan, block_size=BLOCKS)
    computed = _pipe_call(pipe, **size)
    dit_sparse.remove(pipe)
    assert torch.equal(shared, computed)


def test_a_branch_shares_only_an_equal_input_and_equal_rotary_embedding():
    from dit_sparse.branch_share import keep_for_other_branch, shared_output

    grid = Grid(1, 2, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, grid.num_tokens, 8, generator=g)
    rotary = (torch.randn(grid.num_tokens, 4, generator=g),)
    state = GenerationState()

    def site(step, branch):
        return AttentionSite("blocks.0.attn1", (HeadStrategy("dense"),) * 2, grid, step, False, 1, branch,
                             get_executor("cpu"), 16, 16, state, {})

    out0, out1 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    keep_for_other_branch(site(0, "cond"), x, rotary, out0)
    assert shared_output(site(0, "uncond"), x, rotary) is None  # the first step only finds that inputs look alike
    keep_for_other_branch(site(1, "cond"), x, rotary, out1)
    assert shared_output(site(1, "uncond"), x, (rotary[0] + 1,)) is None  # other positions: not the same output
    assert shared_output(site(2, "uncond"), x, rotary) is None  # another step's output is never shared
    assert shared_output(site(1, "cond"), x, rotary) is None  # the same branch again is another generation
    got = shared_output(site(1, "uncond"), x, rotary)
    kept = state.branches["blocks.0.attn1"].first.output
    assert torch.equal(got, out1) and got.data_ptr() != kept.data_ptr()
    # An input that differs in one element: not shared, and the module is not looked at again.
    keep_for_other_branch(site(2, "cond"), x, rotary, out1)
    assert shared_output(site(2, "uncond"), x + 1e-3 * (torch.arange(x.numel()) == 5).reshape(x.shape), rotary) is None
    assert state.branches["blocks.0.attn1"].differs
    keep_for_other_branch(site(3, "cond"), x, rotary, out1)
    assert shared_output(site(3, "uncond"), x, rotary) is None


@pytest.mark.parametrize("grad", [False, True])
def test_branches_share_only_without_autograd(grad):
    """A shared output is a detached copy: with gradients on (training) every branch runs its own attention."""
    model = tiny_wan()
    dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    calls = []
    model.blocks[0].attn1.to_q.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 3, 10, 14, generator=g), torch.randn(1, 5, 24, generator=g)
    with torch.set_grad_enabled(grad):
        for t in (900.0, 500.0):
            for branch in ("cond", "uncond"):
                with model.cache_context(branch):
                    model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)
    assert len(calls) == (4 if grad else 3)
