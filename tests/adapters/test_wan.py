"""Wan 2.1 / 2.2: video-only attn1 with RoPE in the processor; cross-attention attn2 passes through."""

import pytest
from adapter_checks import (check_dense_plan_equals_stock_and_remove_restores, check_one_line_form_equals_apply,
                            check_sparse_plan_changes_output)
from tiny_models import tiny_wan, wan_inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_plan_equals_stock_and_remove_restores(batch):
    check_dense_plan_equals_stock_and_remove_restores(tiny_wan, [wan_inputs(batch=batch)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_wan, wan_inputs(batch=2))


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_wan, wan_inputs(batch=2))
