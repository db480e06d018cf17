"""Wan 2.1 / 2.2: video-only attn1 with RoPE in the processor; cross-attention attn2 passes through."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
)
from tiny_models import tiny_wan, wan_inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_plan_equals_stock_and_remove_restores(batch):
    check_dense_plan_equals_stock_and_remove_restores(tiny_wan, [wan_inputs(batch=batch)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_wan, wan_inputs(batch=2))


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_wan, wan_inputs(batch=2))


def tiny_wan_with_coordinates(seed: int = 0):
    """The tiny-shapes subclass (appends 3 coordinate channels in forward) at the tiny Wan's sizes: it keeps Wan's
    attention modules, so the Wan adapter must serve it, in both binding forms."""
    import torch

    from dit_sparse.zoo.transformer import TinyShapesTransformer

    torch.manual_seed(seed)
    return TinyShapesTransformer(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4 + 3, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()


def test_subclass_of_a_supported_transformer_uses_its_adapter():
    from dit_sparse.adapters import adapter_for_transformer

    model = tiny_wan_with_coordinates()
    assert adapter_for_transformer(model).family == adapter_for_transformer(tiny_wan()).family
    check_dense_plan_equals_stock_and_remove_restores(tiny_wan_with_coordinates, [wan_inputs(batch=2)])
    check_sparse_plan_changes_output(tiny_wan_with_coordinates, wan_inputs(batch=2))
    check_one_line_form_equals_apply(tiny_wan_with_coordinates, wan_inputs(batch=2))


def test_unrelated_module_still_has_no_adapter():
    import torch

    from dit_sparse.adapters import UnsupportedModelError, adapter_for_transformer

    with pytest.raises(UnsupportedModelError, match="no adapter for Linear"):
        adapter_for_transformer(torch.nn.Linear(2, 2))


def _stock_wan_rotary(x, freqs_cos, freqs_sin):
    """WanAttnProcessor's RoPE, written out as diffusers 0.42 has it."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("head_dim", [10, 32, 128])  # 10: the stock form; 32 and 128: whole vectors of pairs
def test_rotary_equals_the_stock_arithmetic_bit_for_bit_eager_compiled_and_in_backward(dtype, head_dim):
    import torch

    from dit_sparse.adapters.wan import apply_wan_rotary

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 5, head_dim, generator=g).to(dtype)  # odd batch, sequence and heads
    angles = torch.randn(1, 37, 1, head_dim // 2, generator=g, dtype=torch.float64)
    freqs = [f(angles).repeat_interleave(2, -1).float() for f in (torch.cos, torch.sin)]
    expected = _stock_wan_rotary(x, *freqs)
    got = apply_wan_rotary(x, *freqs)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, expected)
    compiled = torch.compile(apply_wan_rotary, backend="eager", fullgraph=True)(x, *freqs)  # the stock form
    assert torch.equal(compiled, expected)
    if dtype in (torch.float32, torch.float64):
        leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
        weight = torch.randn(x.shape, generator=g).to(dtype)
        (apply_wan_rotary(leaf, *freqs) * weight).sum().backward()
        (_stock_wan_rotary(ref_leaf, *freqs) * weight).sum().backward()
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=0, atol=1e-6)


def test_rotary_of_a_non_contiguous_input():
    import torch

    from dit_sparse.adapters.wan import apply_wan_rotary

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 9, 32, generator=g).transpose(1, 2)  # (1, 9, 3, 32), heads and tokens swapped in memory
    freqs = [torch.randn(1, 9, 1, 32, generator=g) for _ in range(2)]
    assert torch.equal(apply_wan_rotary(x, *freqs), _stock_wan_rotary(x, *freqs))
