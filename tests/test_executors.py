"""The `cpu` executor against the exact `reference` on ragged shapes, for every strategy, pooled levels and fp8."""

import pytest
import torch

from dit_sparse.executors import ExecutorError, get_executor
from dit_sparse.executors.reference import token_mask
from dit_sparse.fp8 import fake_quantize_qkv, sqnr_db
from dit_sparse.layout import Grid
from dit_sparse.plan import HeadStrategy
from dit_sparse.strategies import BuildContext, get_strategy

CASES = [
    ("dense", {}),
    ("diagonal", {"window": [1, 1, 2]}),
    ("multi_diagonal", {"window": [1, 1]}),
    ("vertical_stripe", {"first_frames": 1, "sinks": 3, "columns": [40, 77]}),
    ("block_adaptive", {"tau": 0.6, "cap": 0.5, "min_similarity": 0.2}),
    ("pyramid", {"bands": [0.3, 0.5, 0.7, 0.9], "min_similarity": -1.0}),
]
SHAPES = [(Grid(3, 5, 7), 2, 3, 16, (16, 16)), (Grid(2, 7, 9), 1, 2, 32, (32, 8)), (Grid(1, 9, 7), 2, 1, 8, (8, 24))]


def qkv(grid, batch, heads, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, grid.num_tokens, heads, dim)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def build(name, params, grid, blocks, q, k):
    spec = HeadStrategy.make(name, **params)
    return get_strategy(name).layout(spec.param_dict, BuildContext(grid, blocks[0], blocks[1], q, k))


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("grid,batch,heads,dim,blocks", SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_cpu_matches_reference(name, params, grid, batch, heads, dim, blocks, fp8):
    q, k, v = qkv(grid, batch, heads, dim)
    if name == "pyramid" and blocks[1] % 8:
        pytest.skip("pooled levels need block_k divisible by 8")
    layout = build(name, params, grid, blocks, q, k)
    ref_out, ref_lse = get_executor("reference").run(q, k, v, layout, fp8=fp8)
    out, lse = get_executor("cpu").run(q, k, v, layout, fp8=fp8)
    assert out.shape == q.shape and lse.shape == (batch, heads, grid.num_tokens)
    assert torch.isfinite(out).all()
    assert (out - ref_out).abs().max() <= 1e-5
    assert (lse - ref_lse).abs().max() <= 1e-5


def test_pyramid_case_really_uses_pooled_levels():
    grid, batch, heads, dim, blocks = SHAPES[0]
    q, k, v = qkv(grid, batch, heads, dim)
    layout = build(*CASES[-1], grid, blocks, q, k)
    assert layout.max_level >= 2


def test_reference_is_masked_softmax_for_level_zero_layouts():
    grid, batch, heads, dim, blocks = SHAPES[0]
    q, k, v = qkv(grid, batch, heads, dim)
    layout = build("diagonal", {"window": [0, 1, 1]}, grid, blocks, q, k)
    mask = token_mask(layout, batch, heads)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / dim**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("bhst,bthd->bshd", probs, v)
    out, _ = get_executor("reference").run(q, k, v, layout)
    assert (out - expected).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,params", CASES[:5])
def test_low_precision_error_within_twice_sdpa(dtype, name, params):
    grid, batch, heads, dim, blocks = SHAPES[1]
    q, k, v = qkv(grid, batch, heads, dim, seed=5)
    layout = build(name, params, grid, blocks, q, k)
    ref, _ = get_executor("reference").run(q, k, v, layout)
    mask = token_mask(layout, batch, heads)
    low = [x.to(dtype) for x in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in low), attn_mask=mask
    ).transpose(1, 2)
    out, _ = get_executor("cpu").run(*low, layout)
    assert out.dtype == dtype
    sdpa_err = (sdpa.float() - ref).abs().max()
    ours_err = (out.float() - ref).abs().max()
    assert ours_err <= 2 * sdpa_err + 1e-6


def test_fp8_quantization_keeps_sqnr_above_25db():
    grid = Grid(4, 8, 8)
    g = torch.Generator().manual_seed(0)
    # Scales of RMS-normed q/k in DiTs (unit variance), with the shared key offset that centring removes.
    q = torch.randn(1, grid.num_tokens, 2, 64, generator=g)
    k = torch.randn(1, grid.num_tokens, 2, 64, generator=g) + 3.0
    v = torch.randn(1, grid.num_tokens, 2, 64, generator=g)
    layout = build("dense", {}, grid, (64, 64), q, k)
    exact, _ = get_executor("reference").run(q, k, v, layout)
    quant, _ = get_executor("reference").run(q, k, v, layout, fp8=True)
    assert sqnr_db(exact, quant) >= 25.0
    qq, kq, vq = fake_quantize_qkv(q, k, v, 64, 64)
    assert not torch.equal(qq, q)  # really quantized


def test_nan_inputs_propagate_like_dense_attention():
    grid, batch, heads, dim, blocks = SHAPES[0]
    q, k, v = qkv(grid, batch, heads, dim)
    q[0, 5, 0, 0] = float("nan")
    layout = build("diagonal", {"window": [1, 1, 1]}, grid, blocks, q, k)
    out, _ = get_executor("cpu").run(q, k, v, layout)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert torch.isnan(out[0, 5, 0]).all() and torch.isnan(dense[0, 5, 0]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, :, 1]).all()


def test_non_contiguous_inputs():
    grid, batch, heads, dim, blocks = SHAPES[0]
    q, k, v = qkv(grid, batch, heads * 2, dim)
    q, k, v = q[:, :, ::2], k[:, :, ::2], v[:, :, ::2]
    assert not q.is_contiguous()
    layout = build("diagonal", {"window": [1, 1, 1]}, grid, blocks, q, k)
    ref, _ = get_executor("reference").run(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    out, _ = get_executor("cpu").run(q, k, v, layout)
    assert (out - ref).abs().max() <= 1e-5


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ExecutorError, match="unknown executor 'warp-drive'; known: .*cpu.*reference"):
        get_executor("warp-drive")


def test_the_triton_executor_on_cpu_says_what_it_needs():
    # Registered or not (importing the kernels registers it), it cannot run on the CPU.
    with pytest.raises(ExecutorError, match="needs a CUDA GPU"):
        get_executor("triton", "cpu")
    import dit_sparse.kernels.executor  # noqa: F401
    with pytest.raises(ExecutorError, match="cannot run on cpu; it needs a CUDA GPU"):
        get_executor("triton", "cpu")


def test_fp8_lse_is_that_of_the_original_scores():
    grid = Grid(2, 6, 8)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, grid.num_tokens, 2, 32, generator=g)
    k = torch.randn(1, grid.num_tokens, 2, 32, generator=g) + 2.0  # a large shared offset that centring removes
    v = torch.randn(1, grid.num_tokens, 2, 32, generator=g)
    layout = build("diagonal", {"window": [1, 1, 1]}, grid, (32, 32), q, k)
    for name in ("reference", "cpu"):
        _, exact = get_executor(name).run(q, k, v, layout)
        _, quant = get_executor(name).run(q, k, v, layout, fp8=True)
        assert (exact - quant).abs().max() < 0.1 * exact.abs().max()
        assert (exact - quant).abs().mean() < 0.05


def test_a_processor_checks_the_executor_name_when_built_and_the_device_at_the_first_call():
    import dit_sparse.kernels.executor  # noqa: F401  (registers triton, as on a GPU machine)
    from dit_sparse import SparsePlan, SparseProcessor
    from dit_sparse.plan import ModelFingerprint

    plan = SparsePlan(ModelFingerprint("WanTransformer3DModel", 2, 2, 16))
    assert SparseProcessor(plan, executor="triton").executor_name == "triton"  # its device is not known yet
    with pytest.raises(ExecutorError, match="unknown executor 'warp-drive'"):
        SparseProcessor(plan, executor="warp-drive")
