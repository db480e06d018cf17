"""Flux: joint attention with the text first, RoPE on text and image, double and single blocks, grid from img_ids."""

import pytest
import torch
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
    run,
)
from tiny_models import flux_inputs, tiny_flux

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.adapters.flux import grid_from_ids
from dit_sparse.layout import Grid


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_plan_equals_stock_and_remove_restores(batch):
    check_dense_plan_equals_stock_and_remove_restores(tiny_flux, [flux_inputs(batch=batch)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_flux, flux_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_flux, flux_inputs())


def test_single_blocks_are_numbered_after_double_blocks_and_find_the_text_from_the_grid():
    model = tiny_flux()
    assert [i for _, i in adapter_for_transformer(model).covered_modules(model)] == [0, 1, 2, 3]
    x = flux_inputs(height=7, width=5, text=4)
    stock = run(model, x)
    # Only the single blocks sparse: the text/image split there comes from the grid alone.
    plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]).with_schedule(dense_layers=(0, 1))
    processor = dit_sparse.apply(model, plan, block_size=(16, 16))
    out = run(model, x)
    assert processor.grid_of(model) == Grid(1, 7, 5)
    assert processor.stats.executed_density < 1
    assert 0 < float((out - stock).abs().max()) and float((out - stock).norm() / stock.norm()) < 1


def test_grid_from_ids():
    ids = torch.zeros(4, 6, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None] + 2, torch.arange(6)[None, :]
    assert grid_from_ids(ids.reshape(-1, 3)) == Grid(1, 4, 6)
    assert grid_from_ids(ids.reshape(1, -1, 3)) == Grid(1, 4, 6)
    reference = ids.clone()
    reference[..., 0] = 1  # Kontext-style reference image tokens appended to the ids
    with pytest.raises(ValueError, match="single image grid"):
        grid_from_ids(torch.cat([ids, reference]).reshape(-1, 3))
