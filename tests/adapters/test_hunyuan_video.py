"""HunyuanVideo: double and single blocks, text last with padding, the token refiner passing through."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
    run,
)
from tiny_models import hunyuan_video_inputs, tiny_hunyuan_video

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.layout import Grid


@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_dense_plan_equals_stock_and_remove_restores(batch, padded):
    check_dense_plan_equals_stock_and_remove_restores(
        tiny_hunyuan_video, [hunyuan_video_inputs(batch=batch, padded=padded)]
    )


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_hunyuan_video, hunyuan_video_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_hunyuan_video, hunyuan_video_inputs())


def test_layers_are_numbered_across_both_stacks():
    model = tiny_hunyuan_video()
    covered = adapter_for_transformer(model).covered_modules(model)
    assert covered == [("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1),
                       ("single_transformer_blocks.0.attn", 2), ("single_transformer_blocks.1.attn", 3)]
    x = hunyuan_video_inputs()
    stock = run(model, x)
    sparse = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1])
    # Dense layers 0 and 1 are the double blocks only: the single blocks stay sparse, and the other way round.
    for dense_layers in [(0, 1), (2, 3)]:
        processor = dit_sparse.apply(model, sparse.with_schedule(dense_layers=dense_layers), block_size=(16, 16))
        assert float((run(model, x) - stock).abs().max()) > 1e-4
        assert processor.stats.executed_density < 1
        dit_sparse.remove(model)
    dit_sparse.apply(model, sparse.with_schedule(dense_layers=(0, 1, 2, 3)), block_size=(16, 16))
    assert float((run(model, x) - stock).abs().max()) <= 1e-6


def test_grid_and_the_token_refiner_passes_through():
    model = tiny_hunyuan_video()
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    run(model, hunyuan_video_inputs(frames=2, height=6, width=10))
    assert processor.grid_of(model) == Grid(2, 3, 5)
    bindings = {b.name: b for b in processor._states[id(model)].bindings.values()}
    refiner = [name for name in bindings if name.startswith("context_embedder.")]
    assert refiner and not any(bindings[name].covered for name in refiner)
    assert sum(b.covered for b in bindings.values()) == 4
