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
