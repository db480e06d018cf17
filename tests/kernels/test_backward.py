"""The Triton backward kernels (dq, dk, dv) against autograd through the exact reference, in fp32."""

import math

import pytest
import torch
from kernel_cases import nan_like, nan_past_end, qkv, random_layout, to_device

from dit_sparse.executors.reference import reference_attention
from dit_sparse.kernels import segments
from dit_sparse.kernels.attention import block_sparse_attention
from dit_sparse.kernels.launch import launch_backward
from dit_sparse.layout import BlockLayout

REL = 1e-3


def reference_grads(q, k, v, layout, do, dlse, scale):
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(qr, kr, vr, layout, scale=scale)
    loss = (out * do).sum() + ((lse * dlse).sum() if dlse is not None else 0)
    loss.backward()
    return out.detach(), lse.detach(), (qr.grad, kr.grad, vr.grad)


def kernel_grads(do, q, k, v, out, lse, dlse, layout, scale, **tiles):
    idx, cnt = segments.level0_lut(layout)
    tidx, tcnt = segments.transposed_lut(layout)
    delta = (do * out).sum(-1).transpose(1, 2).contiguous()
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = nan_like(q), nan_like(q), nan_like(q)
    launch_backward(do, q, k, v, lse, delta, idx, cnt, tidx, tcnt, dq, dk, dv, block_q=layout.block_q,
                    block_k=layout.block_k, scale=scale, **tiles)
    return dq, dk, dv


def rel_err(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def check(q, k, v, layout, with_dlse=False, **tiles):
    scale = 1 / math.sqrt(q.shape[-1])
    g = torch.Generator().manual_seed(11)
    do = torch.randn(q.shape, generator=g).to(q.device)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g).to(q.device) if with_dlse else None
    out, lse, want = reference_grads(q, k, v, layout, do, dlse, scale)
    got = kernel_grads(do, q, k, v, out, lse, dlse, layout, scale, **tiles)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= REL, f"d{name}"
    return got


@pytest.mark.parametrize("seq", [63, 200, 317])
def test_random_layouts(seq, device):
    q, k, v = qkv(2, seq, 2, 16, device=device, seed=seq)
    check(q, k, v, random_layout(seq, 64, 64, batch=2, heads=2, density=0.4, seed=seq, device=device))


@pytest.mark.parametrize("seq, block_k, block_n", [(200, 64, 64), (300, 128, 32), (192, 128, 64)])
def test_dq_reads_only_the_ragged_tile_masked(seq, block_k, block_n, device):
    # k and v rows past S are NaN: the dq kernel's unmasked loop must stop before the tile straddling S (peeled,
    # masked) and skip the tiles wholly past it; count-1 rows (only the ragged block) included.
    q, k, v = qkv(1, seq, 2, 16, device=device, seed=seq)
    layout = random_layout(seq, 64, block_k, heads=2, density=0.3, seed=seq, device=device)
    check(q, nan_past_end(k), nan_past_end(v), layout, block_m=64, block_n=block_n)


def test_gradient_through_the_lse(device):
    # The LSE feeds merges with the dense text part, so its gradient must reach q and k.
    q, k, v = qkv(2, 200, 2, 32, device=device, seed=1)
    check(q, k, v, random_layout(200, 64, 64, batch=2, heads=2, density=0.5, seed=1, device=device), with_dlse=True)


def test_uneven_blocks_and_tiles(device):
    q, k, v = qkv(1, 317, 2, 16, device=device, seed=2)
    check(q, k, v, random_layout(317, 128, 32, heads=2, density=0.4, seed=2, device=device), block_m=32, block_n=32)


def test_key_blocks_nobody_visits_get_zero_gradients(device):
    # Every query block visits key block 0 only: dk and dv of all other keys must be written as zeros.
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0] = True
    layout = to_device(BlockLayout.from_block_mask(mask, 200, 64, 64), device)
    q, k, v = qkv(1, 200, 1, 16, device=device, seed=3)
    _, dk, dv = check(q, k, v, layout)
    assert dk[:, 64:].abs().max() == 0 and dv[:, 64:].abs().max() == 0


def test_autograd_through_the_public_function(device):
    q, k, v = qkv(2, 130, 2, 16, device=device, seed=4)
    layout = random_layout(130, 64, 64, batch=2, heads=2, density=0.5, seed=4, device=device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = block_sparse_attention(*leaves, layout)
    (out.square().sum() + lse.sum()).backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref_leaves, layout)
    (ref_out.square().sum() + ref_lse.sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) <= REL


def test_pooled_levels_have_no_backward(device):
    q, k, v = (x.requires_grad_() for x in qkv(1, 63, 1, 16, device=device))
    out, _ = block_sparse_attention(q, k, v, random_layout(63, 32, 32, levels=True, device=device))
    with pytest.raises(NotImplementedError, match="pooled levels"):
        out.sum().backward()


def test_fp8_has_no_backward(device):
    q, k, v = (x.requires_grad_() for x in qkv(1, 63, 1, 32, device=device))
    out, _ = block_sparse_attention(q, k, v, random_layout(63, 64, 64, device=device), fp8=True)
    with pytest.raises(NotImplementedError, match="FP8"):
        out.sum().backward()
