"""Ring parallelism cuts a layout to one rank's query rows (count 0 elsewhere): the kernel skips those blocks and
gives the rank's rows exactly what the whole layout gives them."""

import pytest
import torch
from kernel_cases import qkv, random_layout

from dit_sparse.kernels.attention import block_sparse_attention
from dit_sparse.parallel.ring import rows_only


@pytest.mark.parametrize("rows", [slice(0, 70), slice(70, 140), slice(133, 200)])
@pytest.mark.parametrize("levels", [False, True])
def test_a_layout_cut_to_some_rows_gives_those_rows_the_whole_layouts_output(device, rows, levels):
    q, k, v = qkv(1, 200, 2, 32, device=device, seed=3)
    layout = random_layout(200, 64, 64, heads=2, seed=3, device=device, levels=levels)
    full_out, full_lse = block_sparse_attention(q, k, v, layout)
    out, lse = block_sparse_attention(q, k, v, rows_only(layout, rows))
    torch.testing.assert_close(out[:, rows], full_out[:, rows], rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, rows], full_lse[:, :, rows], rtol=0, atol=0)
