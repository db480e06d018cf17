"""PixArt: image-only attn1, cross-attention attn2 with a padded prompt passing through."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
    run,
)
from tiny_models import pixart_inputs, tiny_pixart

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.layout import Grid


@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_dense_plan_equals_stock_and_remove_restores(batch, padded):
    check_dense_plan_equals_stock_and_remove_restores(tiny_pixart, [pixart_inputs(batch=batch, padded=padded)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_pixart, pixart_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_pixart, pixart_inputs())


def test_grid_and_cross_attention_passes_through():
    model = tiny_pixart()
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    run(model, pixart_inputs(height=6, width=18))
    assert processor.grid_of(model) == Grid(1, 3, 9)
    bindings = {b.name: b.covered for b in processor._states[id(model)].bindings.values()}
    assert bindings == {f"transformer_blocks.{i}.attn{j}": j == 1 for i in range(2) for j in (1, 2)}
