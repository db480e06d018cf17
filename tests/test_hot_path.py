"""The hot path: one graph per transformer under torch.compile, no host sync in attention, dense work on SDPA, and
one executor launch for all the sparse heads of a module."""

from __future__ import annotations

import copy

import pytest
import torch

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.dense import LSE_BACKENDS, dense_attention_lse, lse_backend
from dit_sparse.executors import EXECUTORS
from dit_sparse.plan import HeadStrategy, Schedule
from dit_sparse.state import GenerationState

BLOCKS = (16, 16)
DIAGONAL = HeadStrategy.make("multi_diagonal", window=[0.25, 0.25])
STRIPE = HeadStrategy.make("vertical_stripe", first_frames=0, sinks=16)
REUSE = HeadStrategy.make("reuse")
DENSE = HeadStrategy("dense")
SKIP = HeadStrategy("skip")


def wan(heads=4, layers=3, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64,
                                 num_layers=layers, rope_max_seq_len=64).eval()


def inputs(seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 3, 10, 14, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g), return_dict=False)


def plan_of(model, heads_per_layer, **schedule):
    plan = SparsePlan.uniform(model, "dense", schedule=Schedule(**schedule))
    for name in sorted(plan.modules):
        plan = plan.with_module(name, list(heads_per_layer))
    return plan


def steps(model, count=6, branches=("cond", "uncond"), batch=1):
    """A generation's transformer calls: falling timesteps, each step once per branch, as WanPipeline calls them."""
    outs = []
    with torch.no_grad():
        for i in range(count):
            for branch in branches:
                with model.cache_context(branch, step_index=i, num_inference_steps=count):
                    x = inputs(seed=1 + i + (branch == "uncond"), batch=batch)
                    outs.append(model(timestep=torch.full((batch,), 1000.0 * (1 - i / count)), **x)[0])
    return outs


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


PLANS = {
    "static": dict(heads=(DIAGONAL,) * 4),
    "mixed": dict(heads=(DIAGONAL, DENSE, STRIPE, SKIP)),
    "warmup_and_reuse": dict(heads=(REUSE, DIAGONAL, REUSE, STRIPE), dense_above=0.8, refresh_interval=2),
    "whole_module_reuse": dict(heads=(REUSE,) * 4, dense_above=0.8, refresh_interval=3),
    "rescaled": dict(heads=(HeadStrategy.make("multi_diagonal", window=[0.25, 0.25], rescale=True), DIAGONAL,
                            DENSE, DIAGONAL), refresh_interval=2),
}


def _plan(model, name):
    spec = dict(PLANS[name])
    return plan_of(model, spec.pop("heads"), **spec)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_a_compiled_transformer_is_one_graph_and_gives_the_eager_output(name):
    """fullgraph=True: a graph break anywhere in the transformer's forward (blocks included) is an error. Step,
    branch and dense/sparse/refresh decisions are made in the forward pre-hook, outside the graph, so a generation
    compiles a few graphs (one per kind of step: dense, refresh, reuse), not one per step: a second, longer
    generation compiles none."""
    eager = wan()
    compiled = copy.deepcopy(eager)
    dit_sparse.apply(eager, _plan(eager, name), block_size=BLOCKS)
    dit_sparse.apply(compiled, _plan(compiled, name), block_size=BLOCKS)
    torch._dynamo.reset()
    backend = CountingBackend()
    run = torch.compile(compiled, backend=backend, fullgraph=True)
    expected, got = steps(eager), steps(run)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"call {step}: {float((a - b).abs().max()):.3g}"
    assert 1 <= backend.graphs <= 6, backend.graphs
    first = backend.graphs
    steps(run, count=9)
    assert backend.graphs == first


def test_compile_repeated_blocks_compiles_each_block_without_a_break():
    model = wan(layers=4)
    eager = copy.deepcopy(model)
    dit_sparse.apply(eager, _plan(eager, "warmup_and_reuse"), block_size=BLOCKS)
    dit_sparse.apply(model, _plan(model, "warmup_and_reuse"), block_size=BLOCKS)
    torch._dynamo.reset()
    backend = CountingBackend()
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    for a, b in zip(steps(eager, count=4), steps(model, count=4)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # The four blocks share their graphs (no guard tells one block from another): one per kind of step.
    assert 1 <= backend.graphs <= 6, backend.graphs


def test_dynamic_heads_compile_with_a_break_only_where_they_estimate():
    """block_adaptive estimates its layout from q and k (data-dependent sizes): the estimate runs outside the graph
    at refresh steps; the output still equals eager."""
    eager = wan(layers=2)
    compiled = copy.deepcopy(eager)
    spec = dict(heads=(HeadStrategy.make("block_adaptive", tau=0.8), DIAGONAL, DENSE, DIAGONAL), refresh_interval=2)
    for model in (eager, compiled):
        dit_sparse.apply(model, plan_of(model, spec["heads"], refresh_interval=2), block_size=BLOCKS)
    torch._dynamo.reset()
    run = torch.compile(compiled, backend=CountingBackend())
    for a, b in zip(steps(eager, count=4), steps(run, count=4)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_explain_counts_no_graph_break():
    model = wan()
    dit_sparse.apply(model, _plan(model, "mixed"), block_size=BLOCKS)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(timestep=torch.tensor([500.0]), **inputs())
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


class NoHostSync(torch.overrides.TorchFunctionMode):
    """Fails on what reads a tensor's value on the host (.item(), float(), int(), bool(), .tolist()) while
    `armed` (inside an attention module: `_arm_in_attention`)."""

    FORBIDDEN = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
                 torch.Tensor.__bool__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.armed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.armed and func in self.FORBIDDEN:
            raise AssertionError(f"host sync in the attention path: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _arm_in_attention(model, guard):
    """Arm `guard` around every attention module's forward (the transformer's entry, where the timestep is read once
    per forward, stays outside)."""
    handles = []
    for module in model.modules():
        if hasattr(module, "processor") and hasattr(module, "to_q"):
            handles.append(module.register_forward_pre_hook(lambda *_: setattr(guard, "armed", guard.armed + 1)))
            handles.append(module.register_forward_hook(lambda *_: setattr(guard, "armed", guard.armed - 1)))
    return handles


@pytest.mark.parametrize("name", sorted(PLANS))
def test_attention_reads_nothing_back_to_the_host_once_layouts_exist(name):
    model = wan()
    processor = dit_sparse.apply(model, _plan(model, name), executor="cpu", block_size=BLOCKS)
    steps(model, count=1)  # layouts and the executor's tables are built at the first step
    guard = NoHostSync()
    handles = _arm_in_attention(model, guard)
    try:
        with guard:
            steps(model, count=6)
    finally:
        for handle in handles:
            handle.remove()
    assert processor.stats.calls > 0


def test_the_guard_catches_a_host_read():
    guard = NoHostSync()
    guard.armed = 1
    with pytest.raises(AssertionError, match="host sync"), guard:
        float(torch.ones(1).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_attention_does_not_synchronise_the_gpu():
    model = wan().cuda().to(torch.bfloat16)
    dit_sparse.apply(model, _plan(model, "warmup_and_reuse"), block_size=(128, 128))
    x = {k: v.cuda().to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    with torch.no_grad():
        model(timestep=torch.tensor([900.0], device="cuda"), **x)

    handles = []
    for module in model.modules():
        if hasattr(module, "processor") and hasattr(module, "to_q"):
            handles.append(module.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")))
            handles.append(module.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default")))
    try:
        with torch.no_grad():
            for t in (700.0, 500.0, 300.0):
                model(timestep=torch.tensor([t], device="cuda"), **x)
    finally:
        for handle in handles:
            handle.remove()


def test_a_mixed_module_launches_the_executor_once_and_keeps_the_model_weights(monkeypatch):
    """Heads 0 and 2 run one layout, head 3 another, head 1 dense: one executor call per module with per-head
    tables (the scattered heads gathered by an index made once), equal to the exact reference executor; the model's
    own tensors are untouched (nothing permuted)."""
    from dit_sparse.executors import Executor

    heads = (DIAGONAL, DENSE, DIAGONAL, STRIPE)
    model = wan()
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    cpu = EXECUTORS["cpu"]
    counted = Executor("cpu", lambda q, *a, **kw: calls.append(q.shape[2]) or cpu.run(q, *a, **kw), cpu.block_sizes,
                       cpu.available, cpu.priority)
    monkeypatch.setitem(EXECUTORS, "cpu", counted)
    dit_sparse.apply(model, plan_of(model, heads), executor="cpu", block_size=BLOCKS)
    dit_sparse.apply(reference, plan_of(reference, heads), executor="reference", block_size=BLOCKS)
    out = steps(model, count=1, branches=("cond",))[0]
    assert calls == [3] * 3  # one launch of three heads in each of the three layers
    assert torch.allclose(out, steps(reference, count=1, branches=("cond",))[0], atol=1e-5)
    dit_sparse.remove(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_scattered_heads_match_the_reference_head_by_head():
    """attend on its own: the mixed module's output, head by head, equals each strategy's reference output."""
    from dit_sparse.attend import AttentionSite, attend
    from dit_sparse.executors import get_executor
    from dit_sparse.layout import Grid

    grid = Grid(3, 5, 7)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 5, 16, generator=g) for _ in range(3))
    heads = (STRIPE, DIAGONAL, DENSE, DIAGONAL, SKIP)

    def run(spec_heads, executor):
        site = AttentionSite("m", spec_heads, grid, 0, False, 3, "cond", get_executor(executor), *BLOCKS,
                             GenerationState(), {})
        return attend(q, k, v, site)

    mixed = run(heads, "cpu")
    for head, spec in enumerate(heads):
        alone = run((spec,) * 5, "reference")
        assert torch.allclose(mixed[:, :, head], alone[:, :, head], atol=1e-5), (head, spec.strategy)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_lse_is_exact_on_cpu(masked, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(2, 37, generator=g) > 0.3 if masked else None
    out, lse = dense_attention_lse(q, k, v, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / 4.0
    if masked:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected_lse = torch.logsumexp(scores, -1)
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert lse.dtype == torch.float32 and torch.allclose(lse, expected_lse, atol=tol)
    assert torch.allclose(out.float(), expected, atol=tol)
    assert lse_backend(q.transpose(1, 2), masked).name == "cpu_flash"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN and flash LSE backends)")
@pytest.mark.parametrize("masked", [False, True])
def test_every_cuda_lse_backend_is_exact(masked):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 333, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    bias = None
    if masked:
        keep = torch.rand(2, 333, device="cuda", generator=g) > 0.3
        bias = torch.zeros(2, 1, 1, 333, device="cuda", dtype=q.dtype).masked_fill(~keep[:, None, None], float("-inf"))
    want_out, want_lse = next(b for b in LSE_BACKENDS if b.name == "math").run(q, k, v, bias, 128 ** -0.5)
    ran = []
    for backend in LSE_BACKENDS:
        if backend.name in ("math", "cpu_flash") or not backend.usable(q, masked):
            continue
        out, lse = backend.run(q, k, v, bias, 128 ** -0.5)
        assert torch.allclose(lse.float(), want_lse, atol=2e-2), backend.name
        assert torch.allclose(out.float(), want_out.float(), atol=2e-2), backend.name
        ran.append(backend.name)
    assert ran[0] == lse_backend(q, masked).name
