"""SD3 / SD3.5: joint attention with the image first, no RoPE; the dual-attention attn2 covered as image-only."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
)
from tiny_models import sd3_inputs, tiny_sd3

from dit_sparse.adapters import adapter_for_transformer


@pytest.mark.parametrize("batch,dual", [(1, ()), (2, (0,))])
def test_dense_plan_equals_stock_and_remove_restores(batch, dual):
    check_dense_plan_equals_stock_and_remove_restores(lambda: tiny_sd3(dual_attention_layers=dual),
                                                      [sd3_inputs(batch=batch)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_sd3, sd3_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_sd3, sd3_inputs())


def test_dual_attention_layers_are_numbered_after_the_joint_ones():
    model = tiny_sd3(dual_attention_layers=(0, 1))
    assert adapter_for_transformer(model).covered_modules(model) == [
        ("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1),
        ("transformer_blocks.0.attn2", 2), ("transformer_blocks.1.attn2", 3),
    ]
