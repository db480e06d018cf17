"""LTX-Video: video-only attn1 with RoPE in the processor, grid from the forward's num_frames/height/width."""

import pytest
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
    run,
)
from tiny_models import ltx_video_inputs, tiny_ltx_video

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.layout import Grid


@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_dense_plan_equals_stock_and_remove_restores(batch, padded):
    check_dense_plan_equals_stock_and_remove_restores(tiny_ltx_video, [ltx_video_inputs(batch=batch, padded=padded)])


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_ltx_video, ltx_video_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_ltx_video, ltx_video_inputs())


def test_grid_comes_from_forward_kwargs_and_cross_attention_passes_through():
    model = tiny_ltx_video()
    processor = dit_sparse.apply(model, SparsePlan.uniform(model, "dense"))
    run(model, ltx_video_inputs(frames=2, height=3, width=9))
    assert processor.grid_of(model) == Grid(2, 3, 9)
    bindings = {b.name: b.covered for b in processor._states[id(model)].bindings.values()}
    assert bindings == {f"transformer_blocks.{i}.attn{j}": j == 1 for i in range(2) for j in (1, 2)}
    x = ltx_video_inputs()
    del x["num_frames"]
    with pytest.raises(ValueError, match="num_frames"):
        run(model, x)
