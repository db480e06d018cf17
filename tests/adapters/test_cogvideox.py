"""CogVideoX and 1.5: joint attention with the text first, RoPE on the video part only."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
)
from tiny_models import cogvideox_inputs, tiny_cogvideox


@pytest.mark.parametrize("batch,patch_t,frames", [(1, None, 3), (2, None, 3), (2, 2, 6)])
def test_dense_plan_equals_stock_and_remove_restores(batch, patch_t, frames):
    check_dense_plan_equals_stock_and_remove_restores(lambda: tiny_cogvideox(patch_size_t=patch_t),
                                                      [cogvideox_inputs(batch=batch, frames=frames)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_cogvideox, cogvideox_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_cogvideox, cogvideox_inputs())
