"""The `cpu` executor's grouped path: query blocks grouped by how many key rows they visit, exact on any layout."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dit_sparse.executors import get_executor
from dit_sparse.executors.cpu import _groups
from dit_sparse.layout import BlockLayout, num_blocks, own_block_mask


def random_layout(seq, bq, bk, batch, heads, *, pooled=False, seed=0):
    """Per-(batch, head) random block sets of varying size (own block always visited), levels 0-3 if pooled."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = num_blocks(seq, bq), num_blocks(seq, bk)
    mask = (torch.rand(batch, heads, nq, nk, generator=g) < torch.rand(batch, heads, nq, 1, generator=g))
    mask |= own_block_mask(seq, bq, bk)
    levels = torch.randint(0, 4, mask.shape, generator=g) if pooled else None
    return BlockLayout.from_block_mask(mask, seq, bq, bk, levels)


def qkv(batch, seq, heads, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3)]


def assert_matches_reference(q, k, v, layout, fp8=False):
    ref_out, ref_lse = get_executor("reference").run(q, k, v, layout, fp8=fp8)
    out, lse = get_executor("cpu").run(q, k, v, layout, fp8=fp8)
    assert torch.isfinite(out).all()
    assert (out - ref_out).abs().max() <= 1e-5
    assert (lse - ref_lse).abs().max() <= 1e-5


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("layout_batch,layout_heads", [(2, 3), (1, 3), (2, 1), (1, 1)])
@pytest.mark.parametrize("seq,bq,bk", [(203, 32, 16), (130, 16, 24), (97, 64, 8)])
def test_mixed_per_head_and_per_batch_layouts_with_ragged_blocks(pooled, layout_batch, layout_heads, seq, bq, bk):
    if pooled and bk % 8:
        pytest.skip("pooled levels need block_k divisible by 8")
    q, k, v = qkv(2, seq, 3, 16)
    layout = random_layout(seq, bq, bk, layout_batch, layout_heads, pooled=pooled)
    assert_matches_reference(q, k, v, layout)


def test_fp8_on_the_grouped_path():
    q, k, v = qkv(2, 150, 2, 32)
    assert_matches_reference(q, k, v, random_layout(150, 32, 16, 2, 2, pooled=True), fp8=True)


def test_groups_cover_every_query_block_once_without_padding():
    b, h, seq, bq, bk = 2, 3, 203, 32, 16
    layout = random_layout(seq, bq, bk, b, h)
    groups = _groups(layout, b, h, seq, torch.float32, torch.device("cpu"))
    items = torch.cat([g.items for g in groups])
    assert sorted(items.tolist()) == list(range(b * h * layout.num_q_blocks))
    assert len(groups) > 1 and all(g.bias is None for g in groups)  # ragged counts, and no mask at level 0
    visited = layout.block_mask().float() @ torch.tensor([bk] * (seq // bk) + [seq % bk]).float()
    widths = torch.zeros(b * h * layout.num_q_blocks)
    for g in groups:
        widths[g.items] = float(g.width)
    assert torch.equal(widths, visited.flatten())  # each list is exactly the keys visited, no padding


class _ForbidHostSync(TorchFunctionMode):
    """Fails on any tensor-to-host read (.item(), .tolist(), bool(), float(), int())."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            raise AssertionError(f"host sync through {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("max_keys", [None, 24])  # 24: long lists cut into pieces
@pytest.mark.parametrize("pooled", [False, True])
def test_no_host_sync_once_the_layout_is_known(pooled, max_keys, monkeypatch):
    from dit_sparse.executors import cpu

    if max_keys is not None:
        monkeypatch.setattr(cpu, "MAX_KEYS_PER_CALL", max_keys)
    q, k, v = qkv(1, 203, 2, 16)
    layout = random_layout(203, 32, 16, 1, 2, pooled=pooled)
    first, _ = get_executor("cpu").run(q, k, v, layout)
    with _ForbidHostSync():
        again, _ = get_executor("cpu").run(q, k, v, layout)
    assert torch.equal(first, again)


def test_prepare_layout_builds_the_tables_before_the_first_call():
    from dit_sparse.executors.cpu import prepare_layout

    q, k, v = qkv(2, 203, 3, 16)
    layout = random_layout(203, 32, 16, 2, 3, pooled=True)
    prepare_layout(layout, 2, 3, torch.float32, "cpu")
    with _ForbidHostSync():
        out, _ = get_executor("cpu").run(q, k, v, layout)
    assert torch.equal(out, get_executor("cpu").run(q, k, v, layout)[0])


def test_gradients_flow_through_the_grouped_path():
    q, k, v = qkv(1, 150, 2, 16)
    layout = random_layout(150, 32, 16, 1, 2, pooled=True)
    grads = {}
    for name in ("reference", "cpu"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = get_executor(name).run(*leaves, layout)
        # Through out only: the fused kernel's backward ignores the LSE's gradient (so did the ungrouped path).
        out.square().sum().backward()
        grads[name] = [x.grad for x in leaves]
    for ref, ours in zip(grads["reference"], grads["cpu"]):
        assert (ref - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("width,limit", [(1, 4), (7, 7), (8, 7), (50, 16), (2049, 2048), (8192, 2048)])
def test_pieces_cover_the_list_in_near_equal_runs_within_the_limit(width, limit, monkeypatch):
    from dit_sparse.executors import cpu

    monkeypatch.setattr(cpu, "MAX_KEYS_PER_CALL", limit)
    pieces = cpu._pieces(width, whole=False)
    assert pieces[0][0] == 0 and pieces[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap
    lengths = [last - first for first, last in pieces]
    assert max(lengths) <= limit and max(lengths) - min(lengths) <= len(pieces)
    assert len(pieces) == -(-width // limit)
    assert cpu._pieces(width, whole=True) == [(0, width)]


@pytest.mark.parametrize("limit", [5, 24, 40])
@pytest.mark.parametrize("pooled", [False, True])
def test_long_key_lists_cut_into_pieces_match_the_reference(limit, pooled, monkeypatch):
    from dit_sparse.executors import cpu

    monkeypatch.setattr(cpu, "MAX_KEYS_PER_CALL", limit)
    q, k, v = qkv(2, 203, 3, 16)
    layout = random_layout(203, 32, 16, 2, 3, pooled=pooled)
    assert max(g.width for g in _groups(layout, 2, 3, 203 * 2, torch.float32, torch.device("cpu"))) > 2 * limit
    assert_matches_reference(q, k, v, layout)


def test_pieces_on_fp8_and_bf16_inputs(monkeypatch):
    from dit_sparse.executors import cpu

    monkeypatch.setattr(cpu, "MAX_KEYS_PER_CALL", 24)
    q, k, v = qkv(2, 150, 2, 32)
    layout = random_layout(150, 32, 16, 2, 2, pooled=True)
    assert_matches_reference(q, k, v, layout, fp8=True)
    low = [x.bfloat16() for x in (q, k, v)]
    ref_out, ref_lse = get_executor("reference").run(*low, layout)
    out, lse = get_executor("cpu").run(*low, layout)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref_out.float()).abs().max() <= 2e-2 and (lse - ref_lse).abs().max() <= 2e-2


@pytest.mark.parametrize("needs_grad", ["q", "k", "v"])
def test_gradients_are_exact_where_lists_would_be_cut(needs_grad, monkeypatch):
    # The fused kernel's backward drops the LSE's gradient, which a merge of pieces depends on: under autograd the
    # list must stay whole, whichever input asks for gradients.
    from dit_sparse.executors import cpu

    monkeypatch.setattr(cpu, "MAX_KEYS_PER_CALL", 24)
    q, k, v = qkv(1, 150, 2, 16)
    layout = random_layout(150, 32, 16, 1, 2, pooled=True)
    index = "qkv".index(needs_grad)
    grads = {}
    for name in ("reference", "cpu"):
        inputs = [x.clone().requires_grad_(i == index) for i, x in enumerate((q, k, v))]
        out, _ = get_executor(name).run(*inputs, layout)
        out.square().sum().backward()
        grads[name] = inputs[index].grad
    assert (grads["reference"] - grads["cpu"]).abs().max() <= 1e-5
