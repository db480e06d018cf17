"""Mochi: joint attention with the text last, padded text dropped per sample, no set_attn_processor."""

import pytest
import torch
from adapter_checks import (
    check_dense_plan_equals_stock_and_remove_restores,
    check_one_line_form_equals_apply,
    check_sparse_plan_changes_output,
    set_on_every_module,
)
from tiny_models import mochi_inputs, tiny_mochi

from dit_sparse.adapters.mochi import pack_real_text

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")


@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_dense_plan_equals_stock_and_remove_restores(batch, padded):
    check_dense_plan_equals_stock_and_remove_restores(tiny_mochi, [mochi_inputs(batch=batch, padded=padded)])


def test_padding_inside_the_prompt_packs_text_rows_like_the_stock_processor():
    # The stock processor moves the real text rows to the front and zero-fills the rest; with a hole in the
    # middle of a prompt the real rows move, and every attention module's text output must move the same way.
    x = mochi_inputs(batch=2)
    x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]])
    check_dense_plan_equals_stock_and_remove_restores(tiny_mochi, [x])


def test_pack_real_text():
    out = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1) + 1
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    assert pack_real_text(out, mask)[:, :, 0].tolist() == [[1, 3, 0, 0], [5, 6, 7, 8]]


def test_sparse_plan_changes_output():
    check_sparse_plan_changes_output(tiny_mochi, mochi_inputs())


def test_one_line_form_equals_apply():
    check_one_line_form_equals_apply(tiny_mochi, mochi_inputs(), install=set_on_every_module)
